"""GRPO on generated images: UniAR's reinforcement-learning stage, on the project's own model.

    python rl.py                                   # from checkpoints/toy -> runs/rl/checkpoint, plots in runs/rl
    python rl.py --resume                          # continue from runs/rl/state.safetensors (Ctrl-C / SIGTERM save it)
    python rl.py --ckpt CKPT --out OUT --steps 200 --beta 0.04

Group Relative Policy Optimisation (Shao et al., 2024) as UniAR applies it to parallel bitwise generation (paper: the
RL stage). A step:
  1. rollouts: G images per prompt from the current policy (model.generate_image: its own sampler, temperature,
     optional guidance), decoded to pixels (decoder.Decoder.decode) and scored by a weighted stack of reward
     functions of (image, prompt) (RewardStack; the toy GenEval-style evaluator by default); with dynamic sampling
     (the default) rounds of rollouts continue until enough groups with differing rewards are collected (collect);
  2. group-normalised advantages: A = (r - mean_G r) / (std_G r + 1e-4) (group_advantages);
  3. per-bit log-probabilities of the sampled bits from the teacher-forced forward (per_bit_logps: every bit of every
     AR token is one "token" of the policy), for the policy before the update and for a frozen reference model;
  4. several optimisation passes over the rollouts with the clipped importance ratio (separate low / high epsilons),
     the k3 KL estimate against the reference with weight beta, averaged per image, then over images (grpo_loss:
     the official trainer's other normalisations coincide with it for fixed-length images). The vision tower
     (tokenizer and mergers) stays frozen.

Departures from the paper and the official trainer (trl GRPOTrainer, UniAR fork):
    - Several passes per rollout batch (`--passes`, default 2): the official run is on-policy (num_iterations 1,
      so the ratio is identically 1 and clipping never acts); here the later passes are off-policy and clip.
    - Prompts (`--prompt-split heldout`, the default) are two-object scenes of the toy world's held-out split, minus
      the evaluation command's prompts, as the paper's RL stage trains on GenEval-style prompts with a GenEval-style
      reward. After GRPO the held-out combinations are therefore no longer unseen by the policy: it has met them
      through its own samples and the reward (never through a ground-truth image). The train split
      (`--prompt-split train`) gives almost no signal: the SFT toy model already draws its prompts right.
    - Dynamic sampling, from DAPO (Yu et al., 2025): `--filter-groups 8 --max-rounds 8`. A group whose G rewards
      are all equal has zero advantages and only its KL term would train, and on the toy model most groups are like
      that (docs/training.md has the counts). Rounds of `--prompts-per-step`
      prompts are therefore rolled out, with the policy unchanged between rounds, until 8 groups with differing
      rewards are collected or 8 rounds are spent. Only those groups train, with their KL term. A step that finds
      none makes no update.
      `--filter-groups 0` trains on every group of a single round, as the official trainer does.
    - Rollout temperature 1.5 (the official script body says 1.0; the evaluation samples at the checkpoint's 1.0):
      more varied samples put more groups over the filter. The log-probabilities divide the logits by it, as the
      official `logits_use_temperature` does.
    - Rewards come from in-process functions (the toy evaluator), not from reward and decoding servers. The decoder
      runs in-process at the checkpoint's decoder guidance, with `--decode-steps 4` Euler steps instead of the
      checkpoint's 10 (0 uses the checkpoint's): the toy rewards come out the same, at a fraction of the decode time
      (docs/training.md has the measurement).
    - With `--cfg` > 1 the rollouts are drawn from the guided distribution while the log-probabilities are those of
      the conditional policy (the official rollouts use cfg 1.0, the default here too).
    - Plain AdamW with a constant learning rate after a short warm-up, fp32 on CPU; no DeepSpeed, no gradient
      accumulation across processes, one process.
    - One loss normalisation (the official `grpo`): for fixed-length images `bnpo` and `dr_grpo` (with the bits of one
      image as the completion length; the official default, 256, counts text tokens) give the same loss and `dapo`
      scales it by a constant, so there is no `--loss-type`.
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

# Apple's GPU: an operation the installed torch lacks on MPS runs on the CPU instead of stopping the run (read when
# torch is imported; a value the user set is kept).
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
import numpy as np
import torch

import cli
import evaluate as E
import files
import load_hf
import model as M
import pipeline as P
import toy

ROOT = Path(__file__).resolve().parent
# An option of earlier versions -> (the one value rl.py computes now, why the others went). A flag or a saved run
# state asking for another value is an `error:` line saying so.
REMOVED = {"loss_type": ("grpo", "for fixed-length images bnpo and dr_grpo give the same loss as grpo and dapo "
                                 "scales it by a constant (scale --lr instead)")}
SCALES = ("group", "batch", "none")
PROMPT_SPLITS = ("heldout", "train")


@dataclass
class RLConfig:
    """Defaults: those of the shipped toy RL checkpoint (docs/training.md has its run time and scores)."""

    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    passes: int = 2
    minibatch: int = 32
    lr: float = 5e-5  # at 1e-4 GRPO diverged from one SFT checkpoint (docs/training.md, GRPO on the toy model)
    warmup: int = 5
    beta: float = 0.01
    eps_low: float = 0.2
    eps_high: float = 0.28
    scale_rewards: str = "group"
    temperature: float = 1.5
    cfg: float = 1.0
    seed: int = 0
    grad_clip: float = 1.0
    eval_n: int = 256
    prompt_split: str = "heldout"
    filter_groups: int = 8
    max_rounds: int = 8
    decode_steps: int = 4

    def __post_init__(self):
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards {self.scale_rewards!r} is not one of {SCALES}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got "
                             f"{self.group_size}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.prompt_split not in PROMPT_SPLITS:
            raise ValueError(f"prompt_split {self.prompt_split!r} is not one of {PROMPT_SPLITS}")
        if self.passes < 1 or self.steps < 0 or self.prompts_per_step < 1 or self.minibatch < 1:
            raise ValueError("passes, prompts_per_step and minibatch must be >= 1 and steps >= 0")
        if self.filter_groups < 0 or self.max_rounds < 1 or self.decode_steps < 0:
            raise ValueError(f"need filter_groups >= 0, max_rounds >= 1 and decode_steps >= 0, got "
                             f"{self.filter_groups}, {self.max_rounds}, {self.decode_steps}")


# ---------------------------------------------------------------------------------------------------------------------
# The pieces a reader looks up
# ---------------------------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group") -> torch.Tensor:
    """(B,) rewards of consecutive groups of G samples -> (B,) advantages: reward minus its group mean, divided by the
    group's (or the batch's) unbiased std + 1e-4, or not divided (scale "none")."""
    if rewards.dim() != 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be (B,) with B a multiple of the group size {G}, got {tuple(rewards.shape)}")
    r = rewards.view(-1, G)
    adv = (r - r.mean(1, keepdim=True)).flatten()
    if scale == "group":
        return adv / (r.std(1).repeat_interleave(G) + 1e-4)
    if scale == "batch":
        return adv / (rewards.std() + 1e-4)
    if scale == "none":
        return adv
    raise ValueError(f"scale {scale!r} is not one of {SCALES}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor], adv: torch.Tensor, *,
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective per bit with the k3 KL penalty, averaged over each image's bits, then over images.

    logp, old_logp, ref_logp: (B, K) per-bit values (K = N * L * U * d); adv (B,).
    Per bit: rho = exp(logp - old_logp); -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    + beta * (exp(ref - logp) - (ref - logp) - 1).
    Every image has the same K bits and no padding, so the official trainer's bnpo and dr_grpo normalisations give
    this same number and dapo's differs only by the constant factor K / N (it counts AR tokens), which is why only
    this one is kept, without the completion mask (all ones here) and the optional ratio cap delta (off officially).
    """
    assert logp.shape == old_logp.shape and adv.shape == logp.shape[:1], (logp.shape, old_logp.shape, adv.shape)
    assert beta == 0.0 or ref_logp is not None, "the KL term needs the reference's log-probabilities"
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_bit = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    kl = None
    if beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_bit = per_bit + beta * kl
    loss = (per_bit.sum(1) / per_bit.new_tensor(per_bit.shape[1])).mean()
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (a < 0)
        high = (ratio > 1 + eps_high) & (a > 0)
        metrics = {"clip_low": float(low.float().mean()), "clip_high": float(high.float().mean()),
                   "clip_fraction": float((low | high).float().mean()),
                   "kl": float(kl.mean()) if kl is not None else 0.0}
    return loss, metrics


def per_bit_logps(net: M.UniAR, prefix_ids: torch.Tensor, attention_mask: torch.Tensor, bits: torch.Tensor,
                  grid_hw: tuple[int, int], temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of every sampled bit under the teacher-forced forward: (B, N * L * U * d), fp32, logits divided
    by the sampling temperature (the official `logits_use_temperature`)."""
    logits = net.teacher_forced_logits(prefix_ids, attention_mask, bits, grid_hw).float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, bits[..., None]).squeeze(-1)  # (B, N, L, U, d)
    return logp.flatten(1)


class RewardStack:
    """Weighted sum of reward functions fn(image (H, W, 3) uint8, prompt) -> float or None. None (the function does
    not apply to this prompt) counts as NaN and is skipped in the sum, like the official nansum."""

    def __init__(self, fns: Sequence[tuple[str, Callable, float]]):
        if not fns:
            raise ValueError("RewardStack needs at least one (name, fn, weight)")
        self.fns = list(fns)

    def __call__(self, images, prompts) -> tuple[torch.Tensor, dict]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        per = {}
        for name, fn, _ in self.fns:
            vals = [fn(im, p) for im, p in zip(images, prompts)]
            per[name] = torch.tensor([float("nan") if v is None else float(v) for v in vals])
        total = torch.stack([w * per[name] for name, _, w in self.fns]).nansum(0)
        return total, per


def toy_geneval_reward(image, prompt: str) -> float:
    """The toy evaluator as a reward: 1 for a fully correct image, else the fraction of attribute checks passed / 2."""
    s = toy.score_image(image, prompt)
    if s["correct"]:
        return 1.0
    return 0.5 * float(np.mean([s[k] for k in ("object", "color", "shape", "position", "count")]))


# ---------------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------------


def train_prompts(k: int, n: int, seed: int, split: str = "heldout", exclude: frozenset = frozenset()) -> list:
    """The n prompts of rollout round k.

    "heldout" (default): two-object scenes of the held-out split, as the paper's RL stage draws GenEval-style prompts
    for a GenEval-style reward; captions in `exclude` (the evaluation prompts) are skipped, so no evaluated prompt is
    ever rolled out. The policy meets held-out combinations only through its own samples and the reward, never
    through a ground-truth image. "train": the train split (the SFT model already draws these right, so the
    advantages are mostly zero)."""
    if split == "train":
        return [toy.t2i_example(k * n + i, "train", seed + 7919).caption for i in range(n)]
    if split != "heldout":
        raise ValueError(f"prompt split {split!r} is not one of {PROMPT_SPLITS}")
    out, i = [], 0
    while len(out) < n:
        rng = np.random.default_rng([seed + 7919, k, i])
        c = toy.caption(toy.sample_scene(rng, "heldout", 2))
        i += 1
        if c not in exclude:
            out.append(c)
    return out


def rollout(net, tok, dec, prompts: list, rc: RLConfig, settings: dict, generator) -> tuple:
    """prompts (each repeated G times consecutively) -> (bits (B, N, L, U, d), images (B, H, W, 3) uint8 numpy)."""
    S = settings["ar_size"][0]
    dev = net.lm_head.weight.device
    ids, mask, _, _ = P.build_generation_batch(net, tok, prompts, S, S, rc.cfg)
    out = M.generate_image(net, ids.to(dev), mask.to(dev), S, S, M.MultinomialSampler(rc.cfg, rc.temperature, generator))
    images = dec.decode(out.bits, S, S, upsampling_ratio=settings["upsample"],
                        steps=rc.decode_steps or settings["steps"], guidance=settings["decoder_cfg"],
                        seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))
    return out.bits, images.cpu().numpy()


def collect(net, tok, dec, rewards: "RewardStack", rc: RLConfig, settings: dict, generator, next_round: Callable,
            ) -> tuple[list, torch.Tensor, torch.Tensor, dict]:
    """Rounds of rollouts for one update -> (prompts, bits, rewards of the groups that train, stats).

    filter_groups = 0: one round of prompts_per_step groups, all of which train (the official trainer). Otherwise
    dynamic sampling (DAPO): a group whose G rewards are all equal has zero advantages and teaches nothing, so rounds
    of prompts_per_step groups are rolled out (the policy unchanged between them) until filter_groups groups with
    differing rewards are collected, or max_rounds rounds are spent; only those groups train."""
    G = rc.group_size
    keep_p, keep_b, keep_r, all_r, all_ok, rounds = [], [], [], [], [], 0
    while rounds < (rc.max_rounds if rc.filter_groups else 1):
        prompts = [p for p in next_round() for _ in range(G)]
        rounds += 1
        bits, images = rollout(net, tok, dec, prompts, rc, settings, generator)
        r, per = rewards(images, prompts)
        all_r.append(r)
        if "geneval" in per:  # toy_geneval_reward is 1 only when fully correct
            all_ok.append(per["geneval"] == 1.0)
        informative = (r.view(-1, G).amax(1) > r.view(-1, G).amin(1)) if rc.filter_groups else \
            torch.ones(len(prompts) // G, dtype=torch.bool)
        for g in torch.nonzero(informative).flatten().tolist():
            keep_p += prompts[g * G:(g + 1) * G]
            keep_b.append(bits[g * G:(g + 1) * G])
            keep_r.append(r[g * G:(g + 1) * G])
        if not rc.filter_groups or len(keep_r) >= rc.filter_groups:
            break
    stats = {"reward": float(torch.cat(all_r).mean()), "rounds": rounds, "groups": len(keep_r),
             "correct": float(torch.cat(all_ok).float().mean()) if all_ok else float("nan")}
    if not keep_r:
        return [], None, None, stats
    return keep_p, torch.cat(keep_b), torch.cat(keep_r), stats


def minibatches(n: int, size: int) -> list:
    return [slice(i, i + size) for i in range(0, n, size)]


def all_logps(model, ids, mask, bits, rc: RLConfig, grid_hw) -> torch.Tensor:
    """per_bit_logps of every rollout, minibatch by minibatch, without gradient: (B, K)."""
    with torch.no_grad():
        return torch.cat([per_bit_logps(model, ids[sl], mask[sl], bits[sl], grid_hw, rc.temperature)
                          for sl in minibatches(len(bits), rc.minibatch)])


def grpo_step(net, ref, opt, ids, mask, bits, adv, rc: RLConfig, grid_hw) -> dict:
    """Several passes of minibatch updates over one batch of rollouts: the clipped objective against the policy's
    log-probabilities before the first update, with the KL to the frozen reference. -> each metric's mean."""
    old = all_logps(net, ids, mask, bits, rc, grid_hw)
    refl = all_logps(ref, ids, mask, bits, rc, grid_hw) if rc.beta != 0 else None
    params = [p for p in net.parameters() if p.requires_grad]
    logs = []
    for _ in range(rc.passes):
        for sl in minibatches(len(bits), rc.minibatch):
            logp = per_bit_logps(net, ids[sl], mask[sl], bits[sl], grid_hw, rc.temperature)
            loss, m = grpo_loss(logp, old[sl], None if refl is None else refl[sl], adv[sl], eps_low=rc.eps_low,
                                eps_high=rc.eps_high, beta=rc.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, rc.grad_clip)
            opt.step()
            logs.append({"loss": float(loss.detach()), **m})
    return {k: float(np.mean([r[k] for r in logs])) for k in logs[0]}


class Policy(NamedTuple):
    """What GRPO trains, and what a resumed run needs to continue it exactly: the policy, the frozen reference (the
    starting checkpoint), the optimizer, and the generator the rollouts draw from."""
    net: M.UniAR
    ref: M.UniAR
    opt: torch.optim.Optimizer
    gen: torch.Generator

    def state(self) -> dict:
        """The run state's tensors: the policy's and the optimizer's (policy_state), and the random generators'."""
        return {**policy_state(self.net, self.opt), "rng.generator": self.gen.get_state(),
                "rng.torch": torch.get_rng_state()}


def make_policy(net, rc: RLConfig, device, tensors: Optional[dict]) -> Policy:
    """The starting checkpoint's model as the policy (tower frozen), a frozen copy of it as the reference, the
    optimizer and the rollouts' generator; with `tensors` (a saved run state) as they were saved."""
    torch.manual_seed(rc.seed)
    ref = copy.deepcopy(net).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    for n, p in net.named_parameters():
        p.requires_grad_(not n.startswith("model.visual."))
    net.eval()  # no dropout anywhere; eval mode keeps the frozen tower's behaviour fixed
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=rc.lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(rc.seed)
    if tensors is not None:
        load_policy_state(tensors, net, opt)
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
    return Policy(net, ref, opt, gen)


def prompt_rounds(meta: dict, rc: RLConfig) -> Callable[[], list]:
    """-> next_round(): the prompts of the next rollout round, new ones every round (meta["rounds"] counts them, so a
    resumed run continues with the next); never an evaluation prompt."""
    exclude = frozenset(toy.heldout_prompts(rc.eval_n))
    rounds = itertools.count(meta.get("rounds", 0))

    def next_round() -> list:
        meta["rounds"] = next(rounds) + 1
        return train_prompts(meta["rounds"] - 1, rc.prompts_per_step, rc.seed, rc.prompt_split, exclude)

    return next_round


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for grp in opt.param_groups:
        grp["lr"] = lr


def grpo(policy: Policy, tok, dec, settings: dict, rc: RLConfig, clock: cli.RunClock) -> bool:
    """The GRPO steps from meta["step"] to rc.steps; the state is saved every --save-every steps, after the last one
    and at Ctrl-C / SIGTERM (clock). -> False when --stop-after stopped it (state saved)."""
    net, ref, opt, gen = policy
    meta, device, S = clock.meta, net.lm_head.weight.device, settings["ar_size"][0]
    grid_hw = (S // net.cfg.downsample, S // net.cfg.downsample)
    rewards, next_round = RewardStack([("geneval", toy_geneval_reward, 1.0)]), prompt_rounds(meta, rc)
    with clock.loop(rc.steps, "GRPO", state=policy.state, seconds=(meta, "train_s"), save_last=True) as loop:
        for step in loop:
            set_lr(opt, rc.lr * min(1.0, (step + 1) / max(1, rc.warmup)))
            with torch.no_grad():  # rollouts, scored; with dynamic sampling only groups whose rewards differ
                prompts, bits, r, stats = collect(net, tok, dec, rewards, rc, settings, gen, next_round)
            m = {}  # stays empty when every group of every round scored alike: nothing to learn from, no update
            if prompts:
                ids, mask = (t.to(device) for t in P.build_generation_batch(net, tok, prompts, S, S, 1.0)[:2])
                adv = group_advantages(r, rc.group_size, rc.scale_rewards).to(device)
                m = grpo_step(net, ref, opt, ids, mask, bits, adv, rc, grid_hw)
            meta["history"].append({"step": step, **stats, **m})
            loop.show(reward=f"{stats['reward']:.3f}", correct=f"{stats['correct']:.2f}",
                      groups=f"{stats['groups']}/{stats['rounds'] * rc.prompts_per_step}",
                      **({"kl": f"{m['kl']:.2e}", "clip": f"{m['clip_fraction']:.3f}"} if m else {}))
        return not loop.stopped


def plot(history: list, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    steps = [h["step"] for h in history]
    upd = [h for h in history if "kl" in h]  # steps that made an update
    ax[0].plot(steps, [h["reward"] for h in history], label="mean reward")
    ax[0].plot(steps, [h["correct"] for h in history], label="fully correct")
    ax[0].set_title("rollout reward (all rollouts of the step)")
    ax[1].plot([h["step"] for h in upd], [h["kl"] for h in upd])
    ax[1].set_title("KL to the reference (k3, per bit)")
    for k in ("clip_fraction", "clip_low", "clip_high"):
        ax[2].plot([h["step"] for h in upd], [h[k] for h in upd], label=k)
    ax[2].set_title("clipped fraction of bits")
    ax[3].plot(steps, [h["groups"] for h in history], label="groups trained")
    ax[3].plot(steps, [h["rounds"] for h in history], label="rollout rounds")
    ax[3].set_title("dynamic sampling")
    for a in ax:
        a.set_xlabel("step")
        a.legend() if a is not ax[1] else None
    fig.tight_layout()
    files.atomic_write(folder / "rl_curves.png", lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def policy_state(net, opt) -> dict:
    """What GRPO changes: the AR weights outside the frozen tower, and the optimizer's moments."""
    return {**{f"net.{k}": v for k, v in net.state_dict().items() if not k.startswith("model.visual.")},
            **files.optimizer_tensors(opt)}


def load_policy_state(tensors: dict, net, opt) -> None:
    """The inverse of policy_state; the frozen tower keeps the starting checkpoint's weights."""
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    tower = {k: v for k, v in net.state_dict().items() if k.startswith("model.visual.")}
    net.load_state_dict({**state, **tower})  # strict: a state of another model is an error, not a partial load
    files.load_optimizer(opt, tensors)


def main(argv=None) -> int:
    """Exit code 0; 2 with one `error: ...` line for bad input; 130 / 143 after Ctrl-C / SIGTERM (state saved)."""
    with cli.SignalGuard() as guard, ExitStack() as locks:  # the run's folder locks go when it ends, however
        guard.run_dir = None
        try:
            return _main(argv, guard, locks)
        except cli.UsageError as e:
            return cli.fail(e)
        except cli.Interrupted as e:
            return cli.report_interrupted(e, guard.run_dir, "GRPO")


def check_removed(given: dict, before: str = "", after: str = "") -> None:
    """The options of REMOVED that `given` sets to another value than the one computed now: a UsageError naming
    them, between `before` and `after`."""
    for k, v in given.items():
        keep, why = REMOVED[k]
        if v != keep:
            raise cli.UsageError(f"{before}--{k.replace('_', '-')} {v}: rl.py computes only {keep} ({why}){after}")


def parse_args(argv) -> tuple[argparse.Namespace, RLConfig]:
    """The command line -> (flags, RLConfig), every value checked (cli.UsageError naming the flag)."""
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=ROOT / "checkpoints" / "toy", help="starting checkpoint")
    cli.add_run_flags(ap, ROOT / "runs" / "rl", "plots, metrics, GRPO state", "RL checkpoint")
    ap.add_argument("--save-every", type=int, default=10, help="save the GRPO state every this many steps "
                    "(default 10; Ctrl-C / SIGTERM also save it)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (saving the state) after this many steps in "
                    "this process, as if interrupted")
    ap.add_argument("--device", default="auto", help="auto (CUDA, else Apple's MPS, else CPU), cpu, cuda, mps")
    ap.add_argument("--no-eval", action="store_true", help="skip the before / after evaluations")
    for f in fields(RLConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        choices=CHOICES.get(f.name), help=f"default {f.default}")
    for name in REMOVED:
        ap.add_argument("--" + name.replace("_", "-"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_removed({k: getattr(args, k) for k in REMOVED if getattr(args, k) is not None})
    given = {f.name: getattr(args, f.name) for f in fields(RLConfig) if getattr(args, f.name) is not None}
    check_config({**{f.name: f.default for f in fields(RLConfig)}, **given})  # every setting in its range
    cli.check_number(args.save_every, "--save-every", 1, integer=True)
    if args.stop_after is not None:
        cli.check_number(args.stop_after, "--stop-after", 1, integer=True, hint="steps in this process")
    try:
        rc = RLConfig(**given)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    return args, rc


CHOICES = {"scale_rewards": SCALES, "prompt_split": PROMPT_SPLITS}


def config_limits(values: dict) -> dict:
    """The range of every RLConfig setting: keyword arguments of cli.check_number, or a check(value, flag)."""
    n = E.heldout_prompt_count()
    heldout = values["prompt_split"] == "heldout"

    def one_of(name):
        def check(v, flag):
            if v not in CHOICES[name]:
                raise cli.UsageError(f"{flag} must be one of {', '.join(CHOICES[name])}, got {v!r}")
        return check

    return {
        "steps": dict(lo=0, integer=True),
        "prompts_per_step": dict(lo=1, integer=True),
        "group_size": dict(lo=2, integer=True, hint="advantages compare the samples of one prompt"),
        "passes": dict(lo=1, integer=True),
        "minibatch": dict(lo=1, integer=True),
        "lr": dict(lo=0, hi=1, lo_open=True),
        "warmup": dict(lo=0, integer=True),
        "beta": dict(lo=0, hint="the weight of the KL penalty"),
        "eps_low": dict(lo=0, hi=1, hi_open=True, hint="the ratio is clipped below at 1 - eps_low"),
        "eps_high": dict(lo=0, hint="the ratio is clipped above at 1 + eps_high"),
        "scale_rewards": one_of("scale_rewards"),
        "temperature": dict(lo=cli.TEMPERATURE_RANGE[0], hi=cli.TEMPERATURE_RANGE[1]),
        "cfg": dict(lo=cli.CFG_RANGE[0], hi=cli.CFG_RANGE[1]),
        "seed": dict(lo=0, hi=cli.SEED_MAX, integer=True, hint="the range torch.Generator.manual_seed takes"),
        "grad_clip": dict(lo=0, lo_open=True, hint="the largest gradient norm"),
        "eval_n": dict(lo=1, hi=n - 1 if heldout else n, integer=True, hint=(
            f"held-out examples per task; the toy world has {n} held-out generation prompts" +
            (", and --prompt-split heldout rolls out those not evaluated" if heldout else ""))),
        "prompt_split": one_of("prompt_split"),
        "filter_groups": dict(lo=0, integer=True, hint="0: every group of one round trains"),
        "max_rounds": dict(lo=1, integer=True),
        "decode_steps": dict(lo=0, integer=True, hint="0: the checkpoint's"),
    }


def check_config(values: dict) -> None:
    """Every setting within its range (UsageError naming the flag and what is valid), before anything loads."""
    for name, limit in config_limits(values).items():
        flag, value = "--" + name.replace("_", "-"), values[name]
        if callable(limit):
            limit(value, flag)
        else:
            cli.check_number(value, flag, **limit)


def run_record(args, rc: RLConfig, run_dir: Path) -> dict:
    """The run's record: a new one, or with --resume the saved one, whose settings must be these flags'."""
    meta = cli.check_run_start(run_dir, args.resume, args.overwrite)
    start = str(Path(args.ckpt).resolve())
    if meta is None:
        return {"config": asdict(rc), "start": start, "eval": not args.no_eval, "step": 0, "history": [],
                "run_id": cli.new_run_id()}
    check_removed({k: v for k, v in meta["config"].items() if k in REMOVED},
                  f"--resume: the state in {run_dir / files.STATE_FILE} was written with ",
                  "; start over with --overwrite")
    differ = [k for k in asdict(rc) if meta["config"].get(k) != asdict(rc)[k]]
    differ += ["--ckpt"] if meta["start"] != start else []
    differ += ["--no-eval"] if meta["eval"] != (not args.no_eval) else []
    if differ:
        raise cli.UsageError(f"--resume: the state in {run_dir / files.STATE_FILE} was written with other settings "
                             f"(different: {', '.join(differ)}); pass the same flags")
    return meta


def open_run(args, rc: RLConfig, locks: ExitStack) -> tuple[Path, dict, Path]:
    """The run folder, the run's record (new, or the saved one to resume) and the checkpoint folder, all checked, with
    the run and checkpoint folders' locks held in `locks`."""
    run_dir = cli.check_out_folder(args.run_dir, "--run-dir")
    out_flag = cli.check_run_folders(run_dir, args.out)

    def begin() -> tuple[dict, Path]:
        meta = run_record(args, rc, run_dir)
        return meta, cli.check_checkpoint_out(out_flag, meta["run_id"], args.overwrite)

    # One run at a time per run folder and per checkpoint folder: a run folder in use is refused first; the checks
    # are made again once both are held, as the folders may have changed in between.
    held = run_dir.is_dir()
    if held:
        locks.enter_context(files.run_lock(run_dir, "--run-dir"))
    begin()
    if not held:
        locks.enter_context(files.run_lock(run_dir, "--run-dir"))
    locks.enter_context(files.run_lock(out_flag, "--out"))
    meta, out = begin()
    return run_dir, meta, out


def load_start(args, device) -> tuple:
    """The starting checkpoint -> (AR model, tokenizer, decoder, sampling settings); a damaged one is a UsageError."""
    try:
        net, tok = load_hf.load_ar(args.ckpt, device=device)
        if not args.no_eval:
            P.image_processor(net)  # the evaluation's understanding needs the checkpoint's preprocessor_config.json
        dec = load_hf.load_decoder(args.ckpt, device=device)
        settings = cli.read_sample_settings(args.ckpt, required=True, defaults={})
    except (load_hf.CheckpointError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    return net, tok, dec, settings


def finish(args, rc: RLConfig, net, tok, dec, settings: dict, meta: dict, run_dir: Path, out: Path) -> None:
    """After GRPO: the checkpoint, the evaluation after (next to the one before), metrics.json and the plots."""
    advice = functools.partial(cli.resume_advice, run_dir)  # after a failed write: where the last state is
    with files.writing(out, advice):
        load_hf.save_checkpoint(out, ar=net, tokenizer_dir=args.ckpt, vision=net.visual, decoder=dec,
                                sample_defaults=settings, run_id=meta["run_id"])
    metrics = {"config": asdict(rc), "start": str(args.ckpt), "train_s": round(meta.get("train_s", 0.0), 1),
               "history": meta["history"]}
    if not args.no_eval:
        after = E.evaluate(net, tok, dec, settings=settings, n=rc.eval_n)
        print("after  " + json.dumps(after), flush=True)
        before = meta["before"]
        metrics.update(before=before, after=after)
        print(f"held-out generation {before['generation']:.3f} -> {after['generation']:.3f}, understanding "
              f"{before['understanding']:.3f} -> {after['understanding']:.3f}", file=sys.stderr)
    with files.writing(run_dir, advice):
        files.atomic_write(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
        if meta["history"]:
            plot(meta["history"], run_dir)
    print(f"checkpoint: {out}  run folder: {run_dir}  (GRPO {metrics['train_s']:.0f}s)", file=sys.stderr)


def _main(argv, guard: cli.SignalGuard, locks: ExitStack) -> int:
    args, rc = parse_args(argv)
    device = cli.resolve_device(args.device)
    run_dir, meta, out = open_run(args, rc, locks)
    net, tok, dec, settings = load_start(args, device)
    tensors = files.load_run_state(run_dir)[1] if args.resume else None
    with files.writing(run_dir, functools.partial(cli.resume_advice, run_dir)):
        run_dir.mkdir(parents=True, exist_ok=True)
        files.clean_run_dir(run_dir)
        if args.overwrite and not args.resume:  # starting over, as the user asked: the earlier state goes
            (run_dir / files.STATE_FILE).unlink(missing_ok=True)
    policy = make_policy(net, rc, device, tensors)
    if not args.no_eval and "before" not in meta:
        meta["before"] = E.evaluate(net, tok, dec, settings=settings, n=rc.eval_n)
        print("before " + json.dumps(meta["before"]), flush=True)
    clock = cli.RunClock(guard, run_dir, meta, save_every=args.save_every, stop_after=args.stop_after,
                         where=lambda m: f"step {m['step']} of {rc.steps}")
    if not grpo(policy, tok, dec, settings, rc, clock):
        return 0
    finish(args, rc, net, tok, dec, settings, meta, run_dir, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
