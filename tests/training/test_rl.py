"""rl.py: the GRPO loss against hand-computed values for every normalisation, the KL term, the clipped gradient,
advantages, the reward stack's values, grpo_step against a hand computation for every loss type (temperature, frozen
reference, counts), per-bit log-probs at a temperature against the official logits, and one end-to-end GRPO run of the
command line on a small model (--scale-rewards reaches the advantages, frozen reference and tower, checkpoint)."""
import copy
import math

import numpy as np
import pytest
import torch

import files
import load_hf
import rl
import toy
import train

# A small case: 2 sequences of 2 bits. logp - old = log(ratio); ratios 1.5, 0.5 | 1.1, 0.7; A = +1, -2.
RATIO = torch.tensor([[1.5, 0.5], [1.1, 0.7]])
ADV = torch.tensor([1.0, -2.0])
OLD = torch.zeros(2, 2)
LOGP = torch.log(RATIO)
# eps 0.2 / 0.28: row 0 (A=+1): min(1.5, 1.28) = 1.28 -> -1.28; min(0.5, 0.8) = 0.5 -> -0.5.
# row 1 (A=-2): min(-2.2, -2.2) = -2.2 -> 2.2; min(-1.4, -1.6) = -1.6 -> 1.6.
PER_BIT = [[-1.28, -0.5], [2.2, 1.6]]


def test_loss_hand_computed():
    """The mean over each sequence's bits, then over sequences; with sequences of equal length this is also the
    official bnpo / dr_grpo number (every bit of the batch / B * K), as the docstring says."""
    got = rl.grpo_loss(LOGP, OLD, None, ADV, eps_low=0.2, eps_high=0.28)[0].item()
    assert got == pytest.approx(((-1.28 - 0.5) / 2 + (2.2 + 1.6) / 2) / 2, abs=1e-6)  # 0.505
    assert got == pytest.approx((-1.28 - 0.5 + 2.2 + 1.6) / 4, abs=1e-6)


def test_kl_term_hand_computed_and_zero_at_reference():
    ref = torch.tensor([[0.1, -0.2], [0.0, 0.3]])
    d = ref - LOGP
    k3 = torch.exp(d) - d - 1
    got = rl.grpo_loss(LOGP, OLD, ref, ADV, eps_low=0.2, eps_high=0.28, beta=0.5)[0].item()
    assert got == pytest.approx((-1.28 - 0.5 + 2.2 + 1.6) / 4 + 0.5 * k3.mean().item(), abs=1e-6)
    lp = torch.randn(3, 5)
    _, m = rl.grpo_loss(lp, lp, lp.clone(), torch.randn(3), beta=0.04)
    assert m["kl"] == 0.0


def test_clipped_gradient_vanishes_outside_the_trust_region():
    # ratio above 1 + eps_high with A > 0 and below 1 - eps_low with A < 0: clipped, zero gradient; inside: not
    logp = torch.log(torch.tensor([[1.5, 1.1], [0.5, 0.9]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    l, m = rl.grpo_loss(logp, torch.zeros(2, 2), None, adv, eps_low=0.2, eps_high=0.28)
    l.backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[1, 0] == 0
    assert g[0, 1] == pytest.approx(-1.1 / 4) and g[1, 1] == pytest.approx(0.9 / 4)
    assert m["clip_fraction"] == pytest.approx(0.5)
    # on the other side the objective is not clipped (min picks the unclipped term): gradient flows
    logp2 = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    rl.grpo_loss(logp2, torch.zeros(1, 1), None, torch.tensor([1.0]))[0].backward()
    assert logp2.grad.item() == pytest.approx(-0.5)


def test_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])
    a = rl.group_advantages(r, 2, "group")
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert a.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0,
                                        1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)])
    assert rl.group_advantages(r, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0, 0, 1, -1])
    b = rl.group_advantages(r, 2, "batch")
    assert b.tolist() == pytest.approx((torch.tensor([0.5, -0.5, 0, 0, 1, -1]) / (r.std() + 1e-4)).tolist())
    with pytest.raises(ValueError, match="multiple of the group size"):
        rl.group_advantages(r, 4)
    with pytest.raises(ValueError, match="scale"):
        rl.group_advantages(r, 2, "bogus")


def test_reward_stack_skips_none():
    """The total is the weighted sum of every function's value, each with its own weight; None is skipped."""
    stack = rl.RewardStack([("a", lambda im, p: 1.0, 0.5), ("b", lambda im, p: None if p == "x" else 2.0, 1.0)])
    total, per = stack([None, None], ["x", "y"])
    assert total.tolist() == [0.5, 2.5] and math.isnan(per["b"][0])
    assert per["a"].tolist() == [1.0, 1.0] and per["b"][1].item() == 2.0  # per-function values are unweighted
    # three functions, no weight equal to 1: 0.25 * 4 + 3 * (-2) + 0.5 * 10 = 0.0 and, without the second, 6.0
    stack = rl.RewardStack([("a", lambda im, p: 4.0, 0.25), ("b", lambda im, p: None if p == "x" else -2.0, 3.0),
                            ("c", lambda im, p: 10.0, 0.5)])
    total, _ = stack([None, None], ["y", "x"])
    assert total.tolist() == [0.0, 6.0]


def test_toy_geneval_reward_values():
    """1 for a fully correct image, else half the fraction of the five attribute checks passed (exact values)."""
    img = toy.render(toy.parse_caption("a red square at the top left"))
    assert rl.toy_geneval_reward(img, "a red square at the top left") == 1.0
    # wrong colour: object, shape and count pass, colour and position fail -> 0.5 * 3 / 5
    assert rl.toy_geneval_reward(img, "a blue square at the top left") == pytest.approx(0.3, abs=1e-12)
    # nothing requested is there: only the count (one object) passes -> 0.5 * 1 / 5
    assert rl.toy_geneval_reward(img, "a green circle at the bottom right") == pytest.approx(0.1, abs=1e-12)
    # the default reward stack of the command line is this function with weight 1
    total, per = rl.RewardStack([("geneval", rl.toy_geneval_reward, 1.0)])([img, img], [
        "a red square at the top left", "a blue square at the top left"])
    assert total.tolist() == pytest.approx([1.0, 0.3])


class BitPolicy(torch.nn.Module):
    """A stand-in policy for grpo_step: the per-bit logits of rollout row r are free parameters z[r] (r = ids[:, 0]),
    so the loss and gradient of a step can be computed by hand."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.nn.Parameter(z.clone())

    def teacher_forced_logits(self, prefix_ids, attention_mask, bits, grid_hw):
        assert tuple(grid_hw) == (1, bits.shape[1])  # the grid reaches the forward
        return self.z[prefix_ids[:, 0]]


def hand_grpo_step(z0, zref, bits, adv, *, T, beta, eps_low, eps_high, lr, passes, mb):
    """grpo_step written out: Bernoulli log-probs at temperature T, old log-probs frozen before the first update,
    k3 KL to the reference, the mean over each image's bits then over images, plain SGD. -> final z, mean loss,
    mean KL, first KL, whether any bit was clipped."""
    s = (2 * bits - 1).double()

    def logp(z):  # log p(bit) = log sigmoid(+-(l1 - l0) / T)
        return torch.nn.functional.logsigmoid(s * (z[..., 1] - z[..., 0]) / T).flatten(1)

    B = bits.shape[0]
    z = z0.double().clone()
    old, ref = logp(z).detach(), logp(zref.double()).detach()
    losses, kls, clipped = [], [], False
    for _ in range(passes):
        for i in range(0, B, mb):
            zz = z.clone().requires_grad_(True)
            lp, o, r, a = logp(zz)[i:i + mb], old[i:i + mb], ref[i:i + mb], adv[i:i + mb, None].double()
            rho = torch.exp(lp - o)
            obj = torch.minimum(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)
            clipped |= bool((((rho > 1 + eps_high) & (a > 0)) | ((rho < 1 - eps_low) & (a < 0))).any())
            kl = torch.exp(r - lp) - (r - lp) - 1
            per = -obj + beta * kl
            loss = per.mean(1).mean()  # mean over each image's bits, then over images
            loss.backward()
            z = z - lr * zz.grad
            losses.append(loss.item())
            kls.append(kl.mean().item())
    return z, float(np.mean(losses)), float(np.mean(kls)), kls[0], clipped


def test_grpo_step_matches_a_hand_computation():
    """grpo_step end to end on a policy whose logits are its parameters: the parameters after
    2 passes x 2 minibatches (3 rows, the last minibatch of 1), the mean loss and the mean KL equal a hand computation.
    This pins the temperature of the log-probs, the old log-probs frozen before the update (the second pass clips),
    the KL against the frozen reference (> 0 from the first minibatch, since the reference differs from the policy),
    the per-minibatch mean over bits and images, and the sign of the update."""
    g = torch.Generator().manual_seed(0)
    B, N, bshape = 3, 2, (1, 2, 2)  # 3 rollouts of 2 AR tokens, 4 bits per token: K = 8 bits per image
    z0 = torch.randn(B, N, *bshape, 2, generator=g)
    zref = z0 + 0.5 * torch.randn(z0.shape, generator=g)
    bits = torch.randint(0, 2, (B, N, *bshape), generator=g)
    adv = torch.tensor([1.5, -1.0, 0.5])
    rc = rl.RLConfig(passes=2, minibatch=2, beta=0.3, temperature=0.7, eps_low=0.2,
                     eps_high=0.28, grad_clip=1e9)
    lr = 3.0
    net, ref = BitPolicy(z0), BitPolicy(zref)
    ref.requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    ids = torch.arange(B)[:, None]
    m = rl.grpo_step(net, ref, opt, ids, torch.ones_like(ids), bits, adv, rc, (1, N))
    z, loss, kl, kl_first, clipped = hand_grpo_step(z0, zref, bits, adv, T=rc.temperature,
                                                    beta=rc.beta, eps_low=rc.eps_low, eps_high=rc.eps_high, lr=lr,
                                                    passes=rc.passes, mb=rc.minibatch)
    assert clipped and kl_first > 1e-3  # the setup exercises clipping and a reference unlike the policy
    torch.testing.assert_close(net.z.detach().double(), z, rtol=1e-5, atol=1e-5)
    assert m["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert m["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-7)
    assert torch.equal(ref.z, zref)  # the reference is never updated


def test_grpo_step_kl_is_against_the_reference_not_the_policy():
    """With beta > 0 and a reference unlike the policy the first minibatch already sees KL > 0 (a policy-as-reference
    bug gives exactly 0), and with the reference equal to the policy the KL of a single pass over it is exactly 0."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 2, 1, 1, 3, 2, generator=g)
    bits = torch.randint(0, 2, z0.shape[:-1], generator=g)
    ids = torch.arange(2)[:, None]
    rc = rl.RLConfig(passes=1, minibatch=2, beta=0.1, temperature=1.0)
    for zref, positive in ((z0 + torch.randn(z0.shape, generator=g), True), (z0, False)):
        net = BitPolicy(z0)
        m = rl.grpo_step(net, BitPolicy(zref), torch.optim.SGD(net.parameters(), lr=0.0), ids, torch.ones_like(ids),
                         bits, torch.tensor([1.0, -1.0]), rc, (1, 2))
        assert (m["kl"] > 1e-3) if positive else (m["kl"] == 0.0)


def test_per_bit_logps_at_a_temperature_equal_the_official_logits_over_t(golden):
    """per_bit_logps = log-softmax(logits / T) at the given bits, i.e. log sigmoid(+-(l1 - l0) / T) per bit, with the
    logits the official teacher-forced forward produced (golden t2i); T = 1 and T = 0.5 give different values."""
    net, _ = load_hf.load_ar(golden.dir)
    sc = golden.scenario("t2i")
    ds = net.cfg.downsample
    grid = (sc["ar_height"] // ds, sc["ar_width"] // ds)
    codes, want_logits = golden["t2i.codes"], golden["t2i.teacher_forced_logits"].double()
    ids, mask = golden["t2i.prefix_ids"][:codes.shape[0]], golden["t2i.attention_mask"][:codes.shape[0]]
    sign = (2 * codes - 1).double()
    # the logits' parity tolerance (tests/parity/test_model.py: 1e-4 in units of max(1, max |logit| / 16), float32 rounding
    # grows with the values); log sigmoid(x / T) moves by at most |dx| / T
    tol = 1e-4 * max(1.0, want_logits.abs().max().item() / 16)
    got, want = {}, {}
    for T in (1.0, 0.5):
        with torch.no_grad():
            got[T] = rl.per_bit_logps(net, ids, mask, codes, grid, temperature=T)
        want[T] = torch.nn.functional.logsigmoid(sign * (want_logits[..., 1] - want_logits[..., 0]) / T).flatten(1)
        assert got[T].shape == want[T].shape
        assert (got[T].double() - want[T]).abs().max().item() <= tol / T, T
    # T reaches the values: they differ between the temperatures as the official logits say, by a gap far above
    # the tolerance (so a T ignored would fail the bounds above), at least half of it in what per_bit_logps gives
    gap = (want[1.0] - want[0.5]).abs().max().item()
    assert gap > 10 * (tol + tol / 0.5), f"the fixture's logits barely tell T = 1 from T = 0.5 ({gap:.3e})"
    assert (got[1.0] - got[0.5]).abs().max().item() > gap / 2


def test_config_errors():
    with pytest.raises(ValueError, match="group_size"):
        rl.RLConfig(group_size=1)
    with pytest.raises(ValueError, match="max_rounds"):
        rl.RLConfig(max_rounds=0)


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ(monkeypatch):
    # A fake policy: rollout k gives every sample of group j the reward stored in its "image"; the reward table per
    # round says which groups are informative.
    G = 2
    table = iter([[1, 1, 0, 1, 5, 5],  # round 1: group 1 differs
                  [0, 0, 2, 2, 3, 3],  # round 2: none
                  [7, 8, 0, 0, 1, 0]])  # round 3: groups 0 and 2 differ
    def fake_rollout(net, tok, dec, prompts, rc, settings, generator):
        r = next(table)
        return torch.arange(len(prompts)).view(-1, 1), [np.full((1,), v) for v in r]

    monkeypatch.setattr(rl, "rollout", fake_rollout)
    stack = rl.RewardStack([("geneval", lambda im, p: float(im[0]), 1.0)])
    prompts = iter(["p%d" % i for i in range(99)])
    next_round = lambda: [next(prompts) for _ in range(3)]
    rc = rl.RLConfig(group_size=G, prompts_per_step=3, filter_groups=3, max_rounds=5)
    kept, bits, r, stats = rl.collect(None, None, None, stack, rc, {}, None, next_round)
    assert kept == ["p1", "p1", "p6", "p6", "p8", "p8"]  # G copies of each kept prompt, in rollout order
    assert bits.flatten().tolist() == [2, 3, 0, 1, 4, 5] and r.tolist() == [0, 1, 7, 8, 1, 0]
    assert stats["rounds"] == 3 and stats["groups"] == 3
    assert stats["reward"] == pytest.approx(np.mean([1, 1, 0, 1, 5, 5, 0, 0, 2, 2, 3, 3, 7, 8, 0, 0, 1, 0]))
    # max_rounds bounds the search; nothing informative -> no batch
    table = iter([[1, 1, 2, 2, 3, 3]] * 2)
    kept, bits, r, stats = rl.collect(None, None, None, stack, rl.RLConfig(group_size=G, prompts_per_step=3,
                                                                        max_rounds=2), {}, None, next_round)
    assert kept == [] and bits is None and stats["rounds"] == 2 and stats["groups"] == 0
    # filter_groups=0: one round, every group trains, as the official trainer
    table = iter([[1, 1, 2, 2, 3, 4]])
    kept, bits, r, stats = rl.collect(None, None, None, stack, rl.RLConfig(group_size=G, prompts_per_step=3,
                                                                        filter_groups=0), {}, None, next_round)
    assert len(kept) == 6 and r.tolist() == [1, 1, 2, 2, 3, 4] and stats["rounds"] == 1


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    tc = train.TrainConfig.smoke()
    args = ["--smoke", "--stage1-steps", "2", "--stage2-steps", "2", "--no-eval", "--run-dir", str(d / "run"),
            "--out", str(d / "ckpt")]
    assert train.main(args) == 0
    return d / "ckpt", tc


def test_per_bit_logps_kl_zero_for_a_copy(small_ckpt):
    net, tok = load_hf.load_ar(small_ckpt[0])
    ref = copy.deepcopy(net)
    S = small_ckpt[1].size
    ids, mask, _, _ = __import__("pipeline").build_generation_batch(net, tok, ["a red square at the top left"] * 2, S, S,
                                                                  1.0)
    g = S // net.cfg.downsample
    bits = torch.randint(0, 2, (2, g * g, *net.bits_shape))
    lp, lr_ = rl.per_bit_logps(net, ids, mask, bits, (g, g)), rl.per_bit_logps(ref, ids, mask, bits, (g, g))
    assert lp.shape == (2, bits[0].numel()) and (lp <= 0).all()
    _, m = rl.grpo_loss(lp, lp, lr_, torch.ones(2), beta=0.1)
    assert m["kl"] == 0.0
    # equals log-softmax of the teacher-forced logits at the sampled bits
    logits = net.teacher_forced_logits(ids, mask, bits, (g, g))
    want = torch.log_softmax(logits, -1).gather(-1, bits[..., None]).flatten(1)
    torch.testing.assert_close(lp, want)


def test_one_grpo_run_end_to_end(small_ckpt, tmp_path, monkeypatch):
    """The command line end to end: `--scale-rewards none` reaches the advantages grpo_step trains on (reward minus
    its group mean, nothing divided), the reference grpo_step gets is a frozen copy of the starting checkpoint at
    every step (not the policy), the tower stays frozen while the AR weights move, and the checkpoint is written."""
    # A 2-step model draws images the toy evaluator scores alike (zero advantages, so no update): reward brightness
    # instead, which differs between the samples of a group, so the policy must move.
    monkeypatch.setattr(rl, "toy_geneval_reward", lambda image, prompt: float(np.asarray(image, np.float32).mean()))
    ckpt = small_ckpt[0]
    before, _ = load_hf.load_ar(ckpt)
    sb = before.state_dict()
    seen = []
    collect, grpo_step = rl.collect, rl.grpo_step

    def spy_collect(*a, **k):
        out = collect(*a, **k)
        seen.append({"r": None if out[2] is None else out[2].clone()})
        return out

    def spy_step(net, ref, opt, ids, mask, bits, adv, rc, grid_hw):
        rs = ref.state_dict()
        seen[-1].update(adv=adv.clone(), ref_is_policy=ref is net, scale=rc.scale_rewards,
                        ref_frozen=all(torch.equal(rs[k], sb[k]) for k in sb))
        return grpo_step(net, ref, opt, ids, mask, bits, adv, rc, grid_hw)

    monkeypatch.setattr(rl, "collect", spy_collect)
    monkeypatch.setattr(rl, "grpo_step", spy_step)
    out = tmp_path / "rl"
    G = 2
    rc = ["--steps", "2", "--prompts-per-step", "2", "--group-size", str(G), "--passes", "2", "--minibatch", "2",
          "--lr", "1e-3", "--scale-rewards", "none", "--filter-groups", "1"]
    assert rl.main(["--ckpt", str(ckpt), "--out", str(out), "--run-dir", str(tmp_path / "run"), "--no-eval"] + rc) == 0
    trained = [x for x in seen if "adv" in x]
    assert len(seen) == 2 and len(trained) == 2  # brightness differs within a group: both steps update
    for x in trained:
        r = x["r"].double().view(-1, G)
        want = (r - r.mean(1, keepdim=True)).flatten()
        assert x["scale"] == "none"  # below: dividing by the group std ("group", the default) would show
        assert (want.view(-1, G) / (r.std(1, keepdim=True) + 1e-4) - want.view(-1, G)).abs().max() > 1e-2
        torch.testing.assert_close(x["adv"].double(), want, rtol=0, atol=1e-4)  # rewards ~ 100, float32
        assert not x["ref_is_policy"] and x["ref_frozen"]
    after, _ = load_hf.load_ar(out)
    assert after.image_processor == before.image_processor is not None  # the same preprocessor_config.json
    sa = after.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb if k.startswith("model.visual."))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if not k.startswith("model.visual."))
    assert (tmp_path / "run" / "rl_curves.png").is_file()
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = __import__("json").load(f)
    assert metrics["config"]["scale_rewards"] == "none" and len(metrics["history"]) == 2
    assert metrics["history"][1]["kl"] > 0  # the second step's policy has left the reference
    load_hf.load_decoder(out)
    assert rl.main(["--ckpt", str(tmp_path / "missing"), "--out", str(out), "--no-eval"]) == 2


RL_TINY = ["--no-eval", "--steps", "4", "--prompts-per-step", "2", "--group-size", "2", "--passes", "2",
           "--minibatch", "2", "--lr", "1e-3", "--filter-groups", "1", "--max-rounds", "2"]


def test_resume_reproduces_the_uninterrupted_run(small_ckpt, tmp_path, monkeypatch):
    """GRPO stopped after step 1 and after step 3 (state saved as on Ctrl-C), resumed each time with --resume: the
    same history (rewards, KL, clipping, rounds) and a bit-identical checkpoint as one uninterrupted run; a resume
    with other settings names them."""
    monkeypatch.setattr(rl, "toy_geneval_reward", lambda image, prompt: float(np.asarray(image, np.float32).mean()))
    flags = ["--ckpt", str(small_ckpt[0])] + RL_TINY
    assert rl.main(flags + ["--run-dir", str(tmp_path / "a")]) == 0
    b = ["--run-dir", str(tmp_path / "b")]
    assert rl.main(flags + b + ["--stop-after", "1"]) == 0
    assert not (tmp_path / "b" / "checkpoint").exists()
    assert rl.main(flags + b + ["--resume", "--stop-after", "2", "--save-every", "1"]) == 0
    assert rl.main(flags + b + ["--resume"]) == 0
    ha, hb = (files.run_state_meta(tmp_path / d)["history"] for d in ("a", "b"))
    assert len(ha) == 4 and sum("kl" in h for h in ha) >= 2 and hb == ha
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / d / "checkpoint" / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rl.main(flags + b + ["--resume", "--beta", "0.5"]) == 2


def test_removed_loss_type_is_one_error_line(small_ckpt, tmp_path, capsys):
    """The loss normalisations that coincide for fixed-length images are gone: `--loss-type dapo` and a run state
    saved with loss_type "dapo" are each one `error:` line saying why (exit code 2); `--loss-type grpo`, the one
    computed, is accepted."""

    run = tmp_path / "run"
    flags = ["--ckpt", str(small_ckpt[0]), "--run-dir", str(run)] + RL_TINY[:1] + ["--steps", "1"] + RL_TINY[3:]
    assert rl.main(flags + ["--loss-type", "dapo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --loss-type dapo: rl.py computes only grpo (") and err.count("\n") == 1, err
    assert rl.main(flags + ["--loss-type", "grpo", "--stop-after", "1"]) == 0
    meta, tensors = files.load_run_state(run)
    meta["config"]["loss_type"] = "dapo"  # as an earlier rl.py wrote it
    files.save_run_state(run, meta, tensors)
    capsys.readouterr()
    assert rl.main(flags + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: the state in {run / files.STATE_FILE} was written with --loss-type dapo: "
                          "rl.py computes only grpo (") and err.endswith("; start over with --overwrite\n"), err


def test_signal_saves_the_grpo_state_and_resume_continues(small_ckpt, tmp_path):
    """Ctrl-C during GRPO once a step is logged: the step finishes, the state is saved, one line says where, exit
    code 130, no traceback; --resume continues from the saved step."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    run = tmp_path / "run"
    flags = ["--ckpt", str(small_ckpt[0]), "--run-dir", str(run)] + RL_TINY[:1] + ["--steps", "200"] + RL_TINY[3:]
    p = subprocess.Popen([sys.executable, str(ROOT / "rl.py")] + flags, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    buf, deadline = b"", time.time() + 240
    while not re.search(rb" [1-9]\d*/200 ", buf):  # tqdm has logged a finished step
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk and time.time() < deadline, buf.decode()[-2000:]
        buf += chunk
    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=120)
    err = (buf + rest).decode()
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    saved = files.run_state_meta(run)["step"]
    assert saved >= 1 and len(files.run_state_meta(run)["history"]) == saved
    assert err.endswith(f"interrupted by SIGINT: GRPO state saved in {run / files.STATE_FILE} (step {saved} of 200); "
                        "continue with the same flags and --resume\n")
    assert rl.main(flags + ["--resume", "--stop-after", "1"]) == 0
    assert files.run_state_meta(run)["step"] == saved + 1


RL_EVAL_N = ("--eval-n must be an integer in [1, {hi}], got {v} (held-out examples per task; the toy world has 561 "
             "held-out generation prompts{more})")
HELDOUT = ", and --prompt-split heldout rolls out those not evaluated"


@pytest.mark.parametrize("flags, message", [
    (["--beta", "-1"], "--beta must be a finite number >= 0, got -1.0 (the weight of the KL penalty)"),
    (["--lr", "nan"], "--lr must be a finite number in (0, 1], got nan"),
    (["--lr", "0"], "--lr must be a finite number in (0, 1], got 0.0"),
    (["--eval-n", "0"], RL_EVAL_N.format(hi=560, v=0, more=HELDOUT)),
    (["--eval-n", "561"], RL_EVAL_N.format(hi=560, v=561, more=HELDOUT)),  # no prompt left to roll out
    (["--eval-n", "562", "--prompt-split", "train"], RL_EVAL_N.format(hi=561, v=562, more="")),
    (["--steps", "-1"], "--steps must be an integer >= 0, got -1"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be an integer >= 1, got 0"),
    (["--group-size", "1"], "--group-size must be an integer >= 2, got 1 (advantages compare the samples of one "
                            "prompt)"),
    (["--passes", "0"], "--passes must be an integer >= 1, got 0"),
    (["--minibatch", "0"], "--minibatch must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--eps-low", "1"], "--eps-low must be a finite number in [0, 1), got 1.0 (the ratio is clipped below at "
                         "1 - eps_low)"),
    (["--eps-high", "nan"], "--eps-high must be a finite number >= 0, got nan (the ratio is clipped above at "
                            "1 + eps_high)"),
    (["--scale-rewards", "bogus"], "argument --scale-rewards: invalid choice: 'bogus' (choose from 'group', 'batch', "
                                   "'none')"),
    (["--prompt-split", "test"], "argument --prompt-split: invalid choice: 'test' (choose from 'heldout', 'train')"),
    (["--temperature", "0"], "--temperature must be a finite number in [0.01, 100], got 0.0"),
    (["--cfg", "0.5"], "--cfg must be a finite number in [1, 100], got 0.5"),
    (["--seed", "-1"], "--seed must be an integer in [0, 18446744073709551615], got -1 (the range "
                       "torch.Generator.manual_seed takes)"),
    (["--grad-clip", "0"], "--grad-clip must be a finite number > 0, got 0.0 (the largest gradient norm)"),
    (["--filter-groups", "-1"], "--filter-groups must be an integer >= 0, got -1 (0: every group of one round trains)"),
    (["--max-rounds", "0"], "--max-rounds must be an integer >= 1, got 0"),
    (["--decode-steps", "-1"], "--decode-steps must be an integer >= 0, got -1 (0: the checkpoint's)"),
    (["--save-every", "0"], "--save-every must be an integer >= 1, got 0"),
    (["--steps", "9999999999999999999999999999999999999999"], "--steps must be at most 2147483647, got 9999999999999999999999999999999999999999"),
    (["--stop-after", "0"], "--stop-after must be an integer >= 1, got 0 (steps in this process)"),
    (["--out", "{run}"], "--out {run} is --run-dir {run}: saving the checkpoint replaces everything in --out; pass "
                         "another --out (default: <run-dir>/checkpoint)"),
])
def test_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, flags, message):
    """One `error:` line naming the flag and what is valid, exit code 2, before the checkpoint is loaded and before
    any folder is made."""
    def loaded(*a, **k):
        raise AssertionError("a check came after loading")

    monkeypatch.setattr(load_hf, "load_ar", loaded)
    run = tmp_path / "run"
    fill = lambda a: a.replace("{run}", str(run))
    rc = rl.main(["--ckpt", str(tmp_path / "ckpt"), "--run-dir", str(run), "--out", str(tmp_path / "o")] +
                 [fill(a) for a in flags])
    assert (rc, capsys.readouterr().err) == (2, f"error: {fill(message)}\n")
    assert list(tmp_path.iterdir()) == []


def test_every_setting_has_a_range_that_its_defaults_meet():
    from dataclasses import asdict, fields

    values = asdict(rl.RLConfig())
    assert list(rl.config_limits(values)) == [f.name for f in fields(rl.RLConfig)]
    rl.check_config(values)


def test_one_grpo_run_at_a_time_per_run_dir(small_ckpt, tmp_path, capsys):
    """While GRPO runs, a second rl.py on its --run-dir is refused at once with one line naming the folder and the
    running process (exit code 2); after the first is killed (SIGKILL), --resume takes the folder over and continues
    the state the first saved."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from test_train import wait_for_a_step

    run = tmp_path / "run"
    flags = ["--ckpt", str(small_ckpt[0]), "--run-dir", str(run), "--save-every", "1"] + RL_TINY[:1] + \
        ["--steps", "200"] + RL_TINY[3:]
    p = subprocess.Popen([sys.executable, str(ROOT / "rl.py")] + flags, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_a_step(p, 200)
        assert rl.main(flags + ["--resume", "--stop-after", "1"]) == 2
        assert capsys.readouterr().err == (f"error: --run-dir {run} is in use by another run (process {p.pid}); wait "
                                           "for it to finish, or pass another --run-dir\n")
        assert p.poll() is None
    finally:
        p.kill()
        p.communicate(timeout=60)
    saved = files.run_state_meta(run)
    assert rl.main(flags + ["--resume", "--stop-after", "1"]) == 0
    after = files.run_state_meta(run)
    assert after["run_id"] == saved["run_id"] and after["step"] == saved["step"] + 1
    assert after["history"][:saved["step"]] == saved["history"]
    assert sorted(p.name for p in run.rglob(".*")) == []


def test_a_full_disk_during_a_grpo_state_save_is_one_line(small_ckpt, tmp_path, capsys, monkeypatch):
    """The disk fills up at the second GRPO state save: one `error:` line naming the run folder, the reason and
    where the last state is (exit code 2); that state is intact, nothing half written is left, and --resume
    continues from it."""
    import errno

    from test_train import disk_full

    run = tmp_path / "run"
    flags = ["--ckpt", str(small_ckpt[0]), "--run-dir", str(run), "--save-every", "1"] + RL_TINY + ["--max-rounds", "1"]
    monkeypatch.setattr(files, "save_file", disk_full(errno.ENOSPC, after=1))
    assert rl.main(flags) == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f"error: cannot write {run}: No space left on device; the state saved before (step 1 of 4) is intact in "
        f"{run / files.STATE_FILE}: free some space (or make the folder writable), then run the same command with "
        "--resume"]
    assert files.run_state_meta(run)["step"] == 1
    assert sorted(p.name for p in run.rglob(".*")) == [] and not (run / "checkpoint").exists()
    monkeypatch.undo()
    assert rl.main(flags + ["--resume", "--stop-after", "1"]) == 0
    assert files.run_state_meta(run)["step"] == 2
