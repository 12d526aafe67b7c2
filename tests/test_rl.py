"""rl.py: the GRPO loss against hand-computed values for every normalisation, the KL term, the clipped gradient,
advantages, the reward stack, and one end-to-end GRPO step on a small model (tower frozen, checkpoint written)."""
import copy
import math

import numpy as np
import pytest
import torch

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


def loss(loss_type, **kw):
    return rl.grpo_loss(LOGP, OLD, None, ADV, torch.ones(2, 2), loss_type=loss_type, eps_low=0.2, eps_high=0.28,
                        **kw)[0].item()


def test_loss_hand_computed_for_each_normalisation():
    assert loss("grpo") == pytest.approx(((-1.28 - 0.5) / 2 + (2.2 + 1.6) / 2) / 2, abs=1e-6)  # 0.505
    assert loss("bnpo") == pytest.approx((-1.28 - 0.5 + 2.2 + 1.6) / 4, abs=1e-6)
    assert loss("dr_grpo", max_completion_length=8) == pytest.approx((-1.28 - 0.5 + 2.2 + 1.6) / (2 * 8), abs=1e-6)
    assert loss("dapo", num_items=3.0) == pytest.approx((-1.28 - 0.5 + 2.2 + 1.6) / 3, abs=1e-6)
    # a mask drops bits from every sum and count: grpo with the second bit of row 0 masked
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    got = rl.grpo_loss(LOGP, OLD, None, ADV, mask, loss_type="grpo", eps_low=0.2, eps_high=0.28)[0].item()
    assert got == pytest.approx((-1.28 + (2.2 + 1.6) / 2) / 2, abs=1e-6)


def test_kl_term_hand_computed_and_zero_at_reference():
    ref = torch.tensor([[0.1, -0.2], [0.0, 0.3]])
    d = ref - LOGP
    k3 = torch.exp(d) - d - 1
    got = rl.grpo_loss(LOGP, OLD, ref, ADV, torch.ones(2, 2), loss_type="bnpo", eps_low=0.2, eps_high=0.28,
                       beta=0.5)[0].item()
    assert got == pytest.approx((-1.28 - 0.5 + 2.2 + 1.6) / 4 + 0.5 * k3.mean().item(), abs=1e-6)
    lp = torch.randn(3, 5)
    _, m = rl.grpo_loss(lp, lp, lp.clone(), torch.randn(3), torch.ones(3, 5), beta=0.04)
    assert m["kl"] == 0.0


def test_clipped_gradient_vanishes_outside_the_trust_region():
    # ratio above 1 + eps_high with A > 0 and below 1 - eps_low with A < 0: clipped, zero gradient; inside: not
    logp = torch.log(torch.tensor([[1.5, 1.1], [0.5, 0.9]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    l, m = rl.grpo_loss(logp, torch.zeros(2, 2), None, adv, torch.ones(2, 2), loss_type="bnpo", eps_low=0.2,
                        eps_high=0.28)
    l.backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[1, 0] == 0
    assert g[0, 1] == pytest.approx(-1.1 / 4) and g[1, 1] == pytest.approx(0.9 / 4)
    assert m["clip_fraction"] == pytest.approx(0.5)
    # on the other side the objective is not clipped (min picks the unclipped term): gradient flows
    logp2 = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    rl.grpo_loss(logp2, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), loss_type="bnpo")[0].backward()
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
    stack = rl.RewardStack([("a", lambda im, p: 1.0, 0.5), ("b", lambda im, p: None if p == "x" else 2.0, 1.0)])
    total, per = stack([None, None], ["x", "y"])
    assert total.tolist() == [0.5, 2.5] and math.isnan(per["b"][0])
    img = toy.render(toy.parse_caption("a red square at the top left"))
    assert rl.toy_geneval_reward(img, "a red square at the top left") == 1.0
    assert rl.toy_geneval_reward(img, "a blue square at the top left") < 1.0


def test_config_errors():
    with pytest.raises(ValueError, match="loss_type"):
        rl.RLConfig(loss_type="ppo")
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
    ids, mask, _, _ = __import__("model").build_generation_batch(net, tok, ["a red square at the top left"] * 2, S, S,
                                                                  1.0)
    g = S // net.cfg.downsample
    bits = torch.randint(0, 2, (2, g * g, *net.bits_shape))
    lp, lr_ = rl.per_bit_logps(net, ids, mask, bits, (g, g)), rl.per_bit_logps(ref, ids, mask, bits, (g, g))
    assert lp.shape == (2, bits[0].numel()) and (lp <= 0).all()
    _, m = rl.grpo_loss(lp, lp, lr_, torch.ones(2), torch.ones_like(lp), beta=0.1)
    assert m["kl"] == 0.0
    # equals log-softmax of the teacher-forced logits at the sampled bits
    logits = net.teacher_forced_logits(ids, mask, bits, (g, g))
    want = torch.log_softmax(logits, -1).gather(-1, bits[..., None]).flatten(1)
    torch.testing.assert_close(lp, want)


def test_one_grpo_run_end_to_end(small_ckpt, tmp_path, monkeypatch):
    # A 2-step model draws images the toy evaluator scores alike (zero advantages, so no update): reward brightness
    # instead, which differs between the samples of a group, so the policy must move.
    monkeypatch.setattr(rl, "toy_geneval_reward", lambda image, prompt: float(np.asarray(image, np.float32).mean()))
    ckpt = small_ckpt[0]
    before, _ = load_hf.load_ar(ckpt)
    out = tmp_path / "rl"
    rc = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--passes", "2", "--minibatch", "2",
          "--lr", "1e-3"]
    assert rl.main(["--ckpt", str(ckpt), "--out", str(out), "--run-dir", str(tmp_path / "run"), "--no-eval"] + rc) == 0
    after, _ = load_hf.load_ar(out)
    sb, sa = before.state_dict(), after.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb if k.startswith("model.visual."))
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if not k.startswith("model.visual."))
    assert (tmp_path / "run" / "rl_curves.png").is_file()
    load_hf.load_decoder(out)
    assert rl.main(["--ckpt", str(tmp_path / "missing"), "--out", str(out), "--no-eval"]) == 2
