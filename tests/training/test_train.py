"""train.py: the smoke configuration trains every part (losses fall), writes a checkpoint load_hf reads, resumes with
the same loss sequence as an uninterrupted run, and runs data-parallel under torchrun with 2 processes; stage 2 reads
flipped bits but trains on clean targets, and the answer loss supervises exactly the answer and its end of turn;
cli.RunClock, the bookkeeping around train.py's and rl.py's loops, saves, stops and defers a signal as documented."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import evaluate
import files
import load_hf
import pipeline as P
import toy
import train
from conftest import ROOT, own_copy


def history(run_dir):
    return files.run_state_meta(run_dir)["history"]


def mean(rows, key, sl):
    return float(np.mean([r[key] for r in rows[sl]]))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("smoke")
    assert train.main(["--smoke", "--run-dir", str(d / "run"), "--out", str(d / "ckpt")]) == 0
    return d


def test_smoke_losses_fall(smoke):
    h = history(smoke / "run")
    tc = train.TrainConfig.smoke()
    assert len(h["stage1"]) == tc.stage1_steps and len(h["stage2"]) == tc.stage2_steps
    assert mean(h["stage1"], "flow", slice(-5, None)) < 0.7 * mean(h["stage1"], "flow", slice(0, 5))
    for k in ("t2i", "edit", "understanding"):
        assert mean(h["stage2"], k, slice(-5, None)) < 0.8 * mean(h["stage2"], k, slice(0, 5)), k
    assert mean(h["stage2"], "bit_acc_l0", slice(-5, None)) > mean(h["stage2"], "bit_acc_l0", slice(0, 5))
    for name in ("losses.png", "stage1_reconstructions.png", "stage2_samples.png", "metrics.json"):
        assert (smoke / "run" / name).is_file(), name
    with open(smoke / "run" / "metrics.json") as f:
        m = json.load(f)
    assert set(m["eval"]) >= {"generation", "understanding", "editing"}
    assert all(0.0 <= m["eval"][k] <= 1.0 for k in ("generation", "understanding", "editing"))


def test_checkpoint_loads_and_matches_training_weights(smoke):
    net, tok = load_hf.load_ar(smoke / "ckpt")
    dec = load_hf.load_decoder(smoke / "ckpt")
    vision = load_hf.load_vision(smoke / "ckpt")
    from safetensors.torch import load_file

    state = load_file(str(smoke / "run" / files.STATE_FILE))
    for k, v in net.state_dict().items():
        if k.startswith("model.visual."):
            torch.testing.assert_close(v, state["vision." + k[len("model.visual."):]], rtol=0, atol=0)
        else:
            torch.testing.assert_close(v, state["net." + k], rtol=0, atol=0)
    for k, v in vision.state_dict().items():
        torch.testing.assert_close(v, state["vision." + k], rtol=0, atol=0)
    for k, v in dec.transformer.state_dict().items():
        torch.testing.assert_close(v, state["dit." + k], rtol=0, atol=0)
    torch.testing.assert_close(dec.prompt_embeds, state["ctx.prompt_embeds"], rtol=0, atol=0)
    # the image preprocessing is the checkpoint's (preprocessor_config.json): training-size images stay as they are
    assert net.image_processor == train.image_processor(train.TrainConfig.smoke())
    assert net.image_processor.min_pixels == net.image_processor.max_pixels == train.TrainConfig.smoke().size ** 2
    # the evaluation's answers (batched, left padded, KV cache) are the greedy continuations a plain full forward
    # of the loaded model gives, stopped at the end of turn
    import pipeline as P

    qa = [toy.qa_example(i, "heldout", 5) for i in range(2)]
    ans = evaluate.answers(net, tok, np.stack([e.image for e in qa]), [e.question for e in qa])
    stop = {tok.eos_id, tok.token_id(P.IM_END)}
    for e, got in zip(qa, ans):
        pv, grid = P.to_pixels(e.image[None], net.cfg.vision)
        n_img = int(grid[0].prod()) // net.cfg.vision.merge_unit
        ids = torch.tensor([tok.encode(P.render_chat_prompt(e.question, n_img))])
        new = []
        with torch.no_grad():
            for _ in range(8):  # evaluate.answers' max_new_tokens
                t = int(net.text_logits(ids, None, pv, grid)[0, -1].argmax())
                if t in stop:
                    break
                new.append(t)
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
        assert got == tok.decode(new)
    with open(smoke / "ckpt" / "uniar_sample.json") as f:
        s = json.load(f)
    assert s["ar_size"] == [train.TrainConfig.smoke().size] * 2 and s["upsample"] == 1.0


def test_resume_reproduces_the_uninterrupted_losses(smoke, tmp_path):
    run = tmp_path / "run"
    args = ["--smoke", "--run-dir", str(run), "--out", str(tmp_path / "ckpt"), "--no-eval"]
    tc = train.TrainConfig.smoke()
    first = tc.stage1_steps // 2  # interrupted inside stage 1 (optimizer state restored mid-stage)
    assert train.main(args + ["--stop-after", str(first)]) == 0
    assert not (tmp_path / "ckpt").exists()
    assert len(history(run)["stage1"]) == first
    second = tc.stage1_steps - first + tc.stage2_steps // 3  # then inside stage 2
    assert train.main(args + ["--resume", "--stop-after", str(second)]) == 0
    assert len(history(run)["stage2"]) == tc.stage2_steps // 3
    assert train.main(args + ["--resume", "--save-every", "7"]) == 0  # bookkeeping settings may change
    got, want = history(run), history(smoke / "run")
    for stage in ("stage1", "stage2"):
        assert [r["loss"] for r in got[stage]] == [r["loss"] for r in want[stage]], stage
    # the metrics survive the resumes: the stage-1 report, and training time summed over the three processes
    m, m0 = (json.loads((d / "metrics.json").read_text()) for d in (run, smoke / "run"))
    assert m["reconstruction_heldout"] == m0["reconstruction_heldout"] is not None
    assert m["time_stage1_s"] > 0 and m["time_stage2_s"] > 0
    assert m["final"] == m0["final"]


def test_a_run_never_replaces_what_it_did_not_write(smoke, tmp_path, capsys):
    """The default checkpoint goes under the run folder; a rerun over a saved state refuses without --resume, a
    checkpoint folder another run wrote is refused as --out; --overwrite does both, as asked."""
    import shutil

    args = ["--smoke", "--stage1-steps", "2", "--stage2-steps", "2", "--no-eval"]
    run = tmp_path / "run"
    assert train.main(args + ["--run-dir", str(run)]) == 0
    assert (run / "checkpoint" / "model.safetensors").is_file() and (run / "checkpoint" / files.RUN_MARK).is_file()
    before = (run / files.STATE_FILE).read_bytes()
    capsys.readouterr()
    assert train.main(args + ["--run-dir", str(run)]) == 2
    assert capsys.readouterr().err == (f"error: --run-dir {run} holds the state of an earlier run (both stages done); "
                                       "continue it with --resume, start over with --overwrite (its state is "
                                       "replaced), or pass another --run-dir\n")
    assert (run / files.STATE_FILE).read_bytes() == before
    other = tmp_path / "other"  # a checkpoint some other run wrote (here the smoke run's)
    shutil.copytree(smoke / "ckpt", other)
    theirs = (other / "model.safetensors").read_bytes()
    assert train.main(args + ["--run-dir", str(tmp_path / "run2"), "--out", str(other)]) == 2
    assert capsys.readouterr().err == (f"error: --out {other} holds files this run did not write (another "
                                       "checkpoint?); pass another --out, or --overwrite to replace them\n")
    assert (other / "model.safetensors").read_bytes() == theirs and not (tmp_path / "run2").exists()
    # the same run may rewrite its own checkpoint (a resume of a finished run does)
    assert train.main(args + ["--run-dir", str(run), "--resume"]) == 0
    assert train.main(args + ["--run-dir", str(run), "--out", str(other), "--overwrite"]) == 0
    assert (other / "model.safetensors").read_bytes() == (run / "checkpoint" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in other.iterdir() if p.name.startswith(".")) == []


def test_resume_refuses_another_configuration(smoke, tmp_path, capsys):
    import shutil

    shutil.copytree(smoke / "run", tmp_path / "run")
    assert train.main(["--smoke", "--seed", "1", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "c"),
                       "--resume"]) == 2
    assert capsys.readouterr().err == (f"error: --resume: the state in {tmp_path / 'run' / files.STATE_FILE} was written "
                                       "with other settings (different: seed); pass the same flags\n")
    assert train.main(["--smoke", "--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--resume"]) == 2
    assert "no training state" in capsys.readouterr().err


def test_stage1_from_a_checkpoint_trains_the_same_stage_2(smoke, tmp_path):
    """--stage1-from the smoke run's checkpoint skips stage 1 and trains stage 2 as that run did: the same losses,
    step by step, and the same checkpoint, weight for weight (how docs/training.md's stage-2 recipes are run)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert train.main(["--smoke", "--run-dir", str(run), "--out", str(tmp_path / "ckpt"), "--no-eval",
                       "--stage1-from", str(smoke / "ckpt")]) == 0
    got, want = history(run), history(smoke / "run")
    assert "stage1" not in got
    assert [r["loss"] for r in got["stage2"]] == [r["loss"] for r in want["stage2"]]
    m, m0 = (json.loads((d / "metrics.json").read_text()) for d in (run, smoke / "run"))
    assert m["reconstruction_heldout"] == m0["reconstruction_heldout"] and m["final"] == m0["final"]
    for part in ("model.safetensors", "bsq_encoder/model.safetensors",
                 "sd3_transformer/diffusion_pytorch_model.safetensors", "sd3_pipeline/prompt_embeds.safetensors"):
        a, b = load_file(str(tmp_path / "ckpt" / part)), load_file(str(smoke / "ckpt" / part))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part
    # another text width: the tokenizer and decoder still fit (the mergers start fresh in stage 2)
    assert train.main(["--smoke", "--lm-width", "96", "--stage2-steps", "2", "--run-dir", str(tmp_path / "w"),
                       "--no-eval", "--stage1-from", str(smoke / "ckpt")]) == 0
    w = load_file(str(tmp_path / "w" / "checkpoint" / "bsq_encoder" / "model.safetensors"))
    theirs = load_file(str(smoke / "ckpt" / "bsq_encoder" / "model.safetensors"))
    tower = [k for k in theirs if not k.startswith(train.MERGERS)]  # the mergers: stage 2 trains them
    assert len(tower) > len(theirs) // 2 and all(torch.equal(w[k], theirs[k]) for k in tower)


def test_stage1_from_refuses_what_it_cannot_use(smoke, tmp_path, capsys):
    """One `error:` line, exit code 2, no folder made: a folder without a checkpoint, a checkpoint of other tokenizer
    or decoder settings, and --resume with it."""
    base = ["--smoke", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "o")]
    none = tmp_path / "none"
    with pytest.raises(load_hf.CheckpointError) as e:
        load_hf.load_ar(none)
    ckpt = smoke / "ckpt"
    other = (f"error: --stage1-from {ckpt}: not the tokenizer and decoder of this run's settings (different: {{}}); "
             "give a checkpoint train.py wrote, with the --size, --vit-* and --dit-* flags it was trained with\n")
    for flags, message in [
            (["--stage1-from", str(none)], f"error: --stage1-from: {e.value}\n"),
            (["--stage1-from", str(ckpt), "--vit-width", "48"],
             other.format("vision hidden_size, vision intermediate_size, vision bsq_hidden_dim, decoder siglip_channels")),
            (["--stage1-from", str(ckpt), "--size", "96"],
             other.format("vision num_position_embeddings, decoder sample_size, decoder pos_embed_max_size, image size")),
            (["--stage1-from", str(ckpt), "--resume"], "error: --stage1-from starts a new run; --resume continues the "
                                                       "saved one (its stage 1 is in its state): pass one of them\n")]:
        assert (train.main(base + flags), capsys.readouterr().err) == (2, message), flags
        assert sorted(p.name for p in tmp_path.iterdir()) == [], flags


def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--smoke", "--stage1-steps", "6", "--stage2-steps", "6", "--no-eval",
           "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "ckpt")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["world"] == 2
    h = history(tmp_path / "run")
    assert len(h["stage1"]) == 6 and len(h["stage2"]) == 6
    net, _ = load_hf.load_ar(tmp_path / "ckpt")  # rank 0 wrote it; every rank checked it holds the same weights
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / files.STATE_FILE))
    for k, v in net.state_dict().items():  # the checkpoint holds the trained weights
        want = state["vision." + k[len("model.visual."):]] if k.startswith("model.visual.") else state["net." + k]
        assert torch.equal(v, want), k


def test_eval_command_prints_one_json_line(smoke):
    """`train.py --eval CKPT` prints one JSON line: the scores the training run's final evaluation gave the same
    weights with the same n and settings."""
    n = train.TrainConfig.smoke().eval_n
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval", str(smoke / "ckpt"), "--eval-n", str(n)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "evaluation: 100%" in r.stderr and f"{4 * n}/{4 * n}" in r.stderr  # progress on stderr, all four tasks
    scores = json.loads(lines[0])
    assert scores["conversation_context_s"] > 0 and scores["conversation_reencoded_s"] > 0

    def no_times(d):  # seconds differ from run to run
        return {k: v for k, v in d.items() if not k.endswith("_s")}

    with open(smoke / "run" / "metrics.json") as f:
        assert no_times(scores) == no_times(json.load(f)["eval"])


def test_eval_command_rejects_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_eval_command_names_a_damaged_config(tmp_path, capsys):
    """A shipped-layout checkpoint whose config.json lost a field: one error line naming the file and the field, exit
    code 2 (before, the full-size default was used and the scores were silently wrong)."""
    import shutil

    root = tmp_path / "toy"
    shutil.copytree(ROOT / "checkpoints" / "toy", root)
    d = json.loads((root / "config.json").read_text())
    del d["text_config"]["max_position_embeddings"]
    (root / "config.json").write_text(json.dumps(d))
    assert train.main(["--eval", str(root), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: {root / 'config.json'}: required field "
                                       "'text_config.max_position_embeddings' is missing: it must be an integer >= 1; "
                                       "restore it from the checkpoint's original file\n")


def test_to_pixels_matches_the_processor():
    vc = train.vision_config(train.TrainConfig.smoke())
    imgs = np.stack([toy.t2i_example(i).image for i in range(3)])
    pv, grid = P.to_pixels(imgs, vc)
    for i, im in enumerate(imgs):
        p, g = P.preprocess_image(im, resize=False)
        n = p.shape[0]
        torch.testing.assert_close(pv[i * n:(i + 1) * n], p, rtol=0, atol=0)
        assert grid[i].tolist() == g[0].tolist()


def test_lr_schedule():
    assert train.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert train.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_muon_steps_as_torchs_muon_and_its_state_survives_a_save(tmp_path):
    """train.Muon takes the steps torch.optim.Muon takes (adjust_lr_fn="match_rms_adamw") on tall, wide and square
    matrices, up to the rounding of its batched bfloat16 products; stage 2's Muon + AdamW pair saves and restores its
    moments as one optimizer's, so a resumed run continues as the uninterrupted one."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (24, 24), (48, 16)]
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    start = [p.detach().clone() for p in ours]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    a = train.Muon(ours, lr=2e-3, weight_decay=0.01)
    b = torch.optim.Muon(ref, lr=2e-3, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step(), b.step()
    for p, q, p0 in zip(ours, ref, start):
        moved = (q - p0).abs().max()
        assert moved > 1e-3 and (p - q).abs().max() < 0.01 * moved  # bfloat16 rounding, not another update

    tc = dataclasses.replace(train.TrainConfig.smoke(), stage2_muon_lr=2e-3)
    tok = P.Tokenizer(toy.save_tokenizer(tmp_path / "tok"))

    def fresh():
        torch.manual_seed(0)
        models = train.build(tc, tok, torch.device("cpu"))
        params = train.stage_params(2, *models)
        return params, train.optimizer(2, params, models, tc.stage2_lr, tc)

    def step(params, opt, k):
        g = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        train.set_lr(opt, 0.5 * tc.stage2_lr)
        opt.step()

    (pa, oa), (pb, ob), (pc, oc) = fresh(), fresh(), fresh()
    muon = oa.opts[1]
    assert isinstance(muon, train.Muon) and muon.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert len(muon.param_groups[0]["params"]) == 7 * (tc.lm_layers + tc.visual_decoder_depth)  # q k v o gate up down
    for k in range(2):
        step(pa, oa, k), step(pb, ob, k)
    assert muon.param_groups[0]["lr"] == pytest.approx(1e-3)  # Muon's rate follows stage2_lr's schedule
    saved = files.optimizer_tensors(ob)
    assert any(k.endswith(".momentum_buffer") for k in saved) and any(k.endswith(".exp_avg_sq") for k in saved)
    with torch.no_grad():
        for p, q in zip(pc, pb):
            p.copy_(q)
    files.load_optimizer(oc, saved)
    step(pa, oa, 2), step(pc, oc, 2)
    assert all(torch.equal(p, q) for p, q in zip(pa, pc))
    # stage 1 with a Muon rate: the tower's and the decoder's block matrices; AdamW alone without one
    vision, net, dec = models = train.build(tc, tok, torch.device("cpu"))
    params = train.stage_params(1, *models)
    assert isinstance(train.optimizer(1, params, models, tc.stage1_lr, tc), torch.optim.AdamW)
    opt = train.optimizer(1, params, models, tc.stage1_lr, dataclasses.replace(tc, stage1_muon_lr=1e-3))
    want = [p for stack in (vision.blocks, dec.transformer.transformer_blocks) for p in stack.parameters() if p.ndim == 2]
    assert [id(p) for p in opt.opts[1].param_groups[0]["params"]] == [id(p) for p in params if id(p) in map(id, want)]
    # per tower block qkv, proj, fc1, fc2; per MMDiT block 14 matrices, 11 in the last (it updates no text context)
    assert len(want) == 4 * tc.vit_depth + 14 * (tc.dit_layers - 1) + 11 and len(params) == sum(
        len(o.param_groups[0]["params"]) for o in opt.opts)


def test_run_clock_saves_stops_and_defers_a_signal(tmp_path):
    """cli.RunClock, the bookkeeping around train.py's and rl.py's loops: the state saved every save_every steps and
    after the last one with save_last, meta["step"] and the time kept; --stop-after counted over the loops of the
    process (the state saved where it stops); a signal during a step lets the step finish, saves the state (once, also
    when a periodic save was due) and raises Interrupted, with the guard's report pointed at the run folder."""
    import signal

    def clock_for(stop_after=None):
        meta, saves = {"step": 0}, []
        clock = cli.RunClock(cli.SignalGuard(), tmp_path, meta, save_every=3, stop_after=stop_after,
                             where=lambda m: f"step {m['step']}")
        return clock, meta, saves, lambda: saves.append(meta["step"]) or {"x": torch.zeros(1)}

    clock, meta, saves, state = clock_for()
    assert clock.guard.run_dir == tmp_path
    with clock.loop(7, "test", state=state, seconds=(meta, "time_s"), save_last=True) as loop:
        assert list(loop) == list(range(7)) and not loop.stopped
    assert saves == [3, 6, 7] and meta["step"] == 7 and meta["time_s"] > 0
    assert files.run_state_meta(tmp_path)["where"] == "step 7"

    clock, meta, saves, state = clock_for(stop_after=4)
    with clock.loop(3, "first", state=state, seconds=(meta, "s")) as loop:
        assert list(loop) == [0, 1, 2] and not loop.stopped
    meta["step"] = 0  # the next loop starts over, as train.py's stage 2 does
    with clock.loop(5, "second", state=state, seconds=(meta, "s")) as loop:
        assert list(loop) == [0] and loop.stopped  # the 4th step of the process
    assert saves == [3, 1]

    for at, want in ((1, [2]), (2, [3])):  # a signal in step 1 (no save due) and in step 2 (the periodic save)
        clock, meta, saves, state = clock_for()
        with pytest.raises(cli.Interrupted) as e:
            with clock.loop(10, "signal", state=state, seconds=(meta, "s")) as loop:
                for step in loop:
                    if step == at:
                        clock.guard._handle(signal.SIGTERM, None)  # deferred: only noted
        assert e.value.exit_code == 143 and saves == want and meta["step"] == at + 1
    clock, meta, saves, state = clock_for()  # a signal during a save: the loop stops there, the state just saved

    def state_signalled():
        clock.guard._handle(signal.SIGINT, None)
        return state()

    with pytest.raises(cli.Interrupted) as e:
        with clock.loop(10, "signal", state=state_signalled, seconds=(meta, "s")) as loop:
            list(loop)
    assert e.value.exit_code == 130 and saves == [3] and meta["step"] == 3


def test_prompt_dropout_empties_a_text_with_probability_p():
    """drop_text (the AR model's guidance training): each text becomes "" with probability p, else stays as it is;
    the count of kept texts lies within 5 binomial standard deviations of n (1 - p), and p = 0 keeps everything."""
    n, p = 4000, 0.3
    texts = [f"caption {i}" for i in range(n)]
    out = train.drop_text(texts, p, torch.Generator().manual_seed(0))
    assert all(o in ("", t) for o, t in zip(out, texts))
    kept = sum(o != "" for o in out)
    assert abs(kept - n * (1 - p)) <= 5 * (n * p * (1 - p)) ** 0.5, kept
    assert out == train.drop_text(texts, p, torch.Generator().manual_seed(0))  # seeded: reproducible
    assert train.drop_text(texts, 0.0, torch.Generator().manual_seed(0)) == texts


def test_read_flips_flip_each_bit_with_probability_p():
    bits = torch.randint(0, 2, (64, 4, 4, 64), generator=torch.Generator().manual_seed(0))
    out = train.read_flips(bits, 0.1, torch.Generator().manual_seed(1))
    frac = (out != bits).float().mean().item()
    assert abs(frac - 0.1) <= 5 * (0.1 * 0.9 / bits.numel()) ** 0.5, frac
    assert torch.equal(out, train.read_flips(bits, 0.1, torch.Generator().manual_seed(1)))  # seeded
    assert set(out.unique().tolist()) <= {0, 1}
    assert train.read_flips(bits, 0.0, torch.Generator().manual_seed(1)) is bits


@pytest.fixture(scope="module")
def smoke_net(tmp_path_factory):
    """An untrained smoke-size AR model (train.build) and the toy tokenizer."""
    import pipeline as P

    tok = P.Tokenizer(toy.save_tokenizer(tmp_path_factory.mktemp("tok")))
    tc = train.TrainConfig.smoke()
    _, net, _ = train.build(tc, tok, torch.device("cpu"))
    return net.eval(), tok, tc


def test_stage2_flips_what_the_model_reads_and_trains_on_clean_targets(smoke_net, monkeypatch):
    """One stage-2 forward (ARLoss) with read flips: the bits the model reads are the tokenizer's bits with about
    read_flip_prob of them flipped, the t2i / edit losses are the cross-entropy against the clean bits of the
    images it draws, and the step's loss is the sum of the task losses with editing weighted by edit_weight."""
    net, tok, tc = smoke_net
    net = own_copy(net)
    tc = dataclasses.replace(tc, stage2_batch=2, read_flip_prob=0.3)
    flips, read = [], []
    flip = train.read_flips
    monkeypatch.setattr(train, "read_flips", lambda b, p, g: flips.append((b, flip(b, p, g))) or flips[-1][1])
    states = net.context_states
    net.context_states = lambda ids, valid, bits, *a, **k: read.append(bits) or states(ids, valid, bits, *a, **k)
    B = tc.stage2_batch
    idx = [train.example_index(0, i, B, 0, 1) for i in range(B)]
    t2i = [toy.t2i_example(i, "train", tc.seed, tc.size) for i in idx]
    ed = [toy.edit_example(i, "train", tc.seed, tc.size) for i in idx]
    loss_mod = train.ARLoss(net, tok, tc)
    clean_t2i = loss_mod.image_bits(np.stack([e.image for e in t2i]))
    clean_edit = loss_mod.image_bits(np.stack([x for e in ed for x in (e.source, e.target)]))
    with torch.no_grad():
        loss, m = loss_mod(0, 0, 1, torch.Generator().manual_seed(0))
    assert len(flips) == 4 and len(read) == 1  # a draw per task (t2i, edit, understanding, conversations); one forward
    assert loss.item() == pytest.approx((m["t2i"] + tc.edit_weight * m["edit"] + m["understanding"] +
                                         m["conversation"]).item(), rel=1e-6)  # the editing loss weighs 3x
    for (clean_in, got), clean in zip(flips, (clean_t2i, clean_edit)):
        assert torch.equal(clean_in, clean)
        frac = (got != clean).float().mean().item()
        assert 0.25 < frac < 0.35, frac
    images = lambda x: sorted(x.flatten(1).tolist())  # noqa: E731  (the packed forward reads them in its own order)
    assert images(read[0].view(-1, *clean_t2i.shape[1:])) == images(torch.cat([got for _, got in flips]))
    T = toy.Turn
    with torch.no_grad():
        out = loss_mod.step_loss([lambda: [[T("user", e.caption), T("model", image=e.image)] for e in t2i],
                                  lambda: [[T("user", e.instruction, e.source), T("model", image=e.target)] for e in ed]],
                                 torch.Generator().manual_seed(1))
    for (bit_loss, _, lg, target, _), clean in zip(out, (clean_t2i, clean_edit[1::2])):
        assert torch.equal(target, clean.flatten(0, 1))
        want = torch.nn.functional.cross_entropy(lg.flatten(0, -2).float(), clean.flatten())
        assert bit_loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_stage2_packs_every_task_into_one_forward_as_if_each_ran_alone(smoke_net, monkeypatch):
    """ARLoss packs a step's contexts of all four tasks into shared rows for one forward, each context attending only
    to itself at its own positions: every task's losses, bit logits, targets and answer metrics are those of
    context_loss, the task's batch in a left-padded forward of its own, with the same random draws (text dropping,
    then read flips, task by task)."""
    net, tok, tc = smoke_net
    tc = dataclasses.replace(tc, stage2_batch=4, cfg_drop=0.5, read_flip_prob=0.2)
    loss_mod = train.ARLoss(net, tok, tc)
    seen, packed = {}, []
    step_loss, pack = loss_mod.step_loss, train.pack_contexts
    monkeypatch.setattr(loss_mod, "step_loss", lambda tasks, g: seen.update(tasks=tasks, out=step_loss(tasks, g))
                        or seen["out"])
    monkeypatch.setattr(train, "pack_contexts", lambda enc, *a: packed.append((len(enc), pack(enc, *a))) or packed[-1][1])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        loss, m = loss_mod(3, 0, 1, g)
        g.manual_seed(5)  # the same draws again, task by task
        alone = [loss_mod.context_loss(build(), g) for build in seen["tasks"]]
    n_contexts, pk = packed[0]
    assert pk.ids.shape[0] < n_contexts  # rows are shared
    for k, (a, b) in enumerate(zip(alone, seen["out"])):
        for x, y in zip(a[:2], b[:2]):
            assert x.item() == pytest.approx(y.item(), rel=1e-5, abs=1e-6), k
        if a[2] is not None:
            torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-5)
            assert torch.equal(a[3], b[3])
        assert a[4].keys() == b[4].keys() and all(a[4][key].item() == b[4][key].item() for key in a[4]), k
    (l_gen, _, _, _, _), (l_edit, *_), (_, l_und, *_), (l_cb, l_ct, *_) = alone
    assert loss.item() == pytest.approx((l_gen + tc.edit_weight * l_edit + l_und + l_cb + l_ct).item(), rel=1e-5)


def test_stage2_tokenizes_each_distinct_image_once_with_the_towers_own_bits(smoke_net):
    """ARLoss.image_bits: the bits of the frozen tokenizer, the same as one batched tower call gives, whatever batch
    an image first came in; an image seen before never reaches the tower again (the toy world repeats scenes)."""
    net, tok, tc = smoke_net
    net = own_copy(net)
    loss_mod = train.ARLoss(net, tok, tc)
    images = np.stack([toy.t2i_example(i, "train", tc.seed, tc.size).image for i in range(6)])
    pv, grid = P.to_pixels(images, net.cfg.vision)
    with torch.no_grad():
        want = net.visual.encode_bits(pv, grid)
    want = want.view(6, -1, *want.shape[1:])  # (images, N, L, U, d)
    calls = []
    encode = net.visual.encode_bits
    net.visual.encode_bits = lambda px, g: calls.append(len(g)) or encode(px, g)
    first = loss_mod.image_bits(images[[0, 1, 2, 0]])  # image 0 twice in one batch
    again = loss_mod.image_bits(images[[5, 2, 4, 3, 1]])  # 1 and 2 seen before
    assert torch.equal(first, want[[0, 1, 2, 0]]) and torch.equal(again, want[[5, 2, 4, 3, 1]])
    assert calls == [1] * 6  # six distinct images, one tower call each


def test_answer_tokens_are_the_answers_and_the_end_of_turn(smoke_net):
    """In a stage-2 context the supervised text positions are exactly the answer's tokens and the <|im_end|> after
    each (nothing of the prompt, no padding, not the newline after the turn), in single-turn questions and in
    conversations, and the understanding loss is the mean cross-entropy over exactly those tokens."""
    import pipeline as P

    net, tok, tc = smoke_net
    qa = [toy.qa_example(i, "train", tc.seed, tc.size) for i in range(2)]
    answers = ["red", "a red circle and a blue square"]
    T = toy.Turn
    convs = [[T("user", e.question, e.image), T("model", a)] for e, a in zip(qa, answers)]
    ctx = train.build_context(tok, convs, 2, 2, 4)
    end = tok.token_id(P.IM_END)
    for b, a in enumerate(answers):
        row = ctx.ids[b][ctx.mask[b].bool()].tolist()
        flags = ctx.answers[b][ctx.mask[b].bool()].tolist()
        want = tok.encode(P.render_chat_prompt(qa[b].question, 4)) + tok.encode(a) + [end]
        assert row[:len(want)] == want
        assert [t for t, f in zip(row, flags) if f] == tok.encode(a) + [end]
        assert flags == [False] * (len(want) - len(tok.encode(a)) - 1) + [True] * (len(tok.encode(a)) + 1) + \
            [False] * (len(row) - len(want))
    conv = toy.conversation_example(3, "train", tc.seed, tc.size)
    ctx = train.build_context(tok, [conv], 2, 2, 4)
    picked = [t for t, f in zip(ctx.ids[0].tolist(), ctx.answers[0].tolist()) if f]
    assert picked == [i for t in conv if t.role == "model" and t.image is None for i in tok.encode(t.text) + [end]]
    loss_mod = train.ARLoss(net, tok, dataclasses.replace(tc, read_flip_prob=0.0))
    with torch.no_grad():
        _, loss, _, _, _ = loss_mod.context_loss(convs, torch.Generator().manual_seed(0))
        ctx = train.build_context(tok, convs, 2, 2, 4)
        h, _ = net.context_states(ctx.ids, ctx.mask, loss_mod.image_bits(ctx.images).flatten(0, 1),
                                  torch.tensor([[1, 4, 4]] * 2))
        logp = torch.log_softmax(net.text_logits_of(h).double(), -1)
    ce = [-logp[b, t - 1, ctx.ids[b, t]].item() for b, t in ctx.answers.nonzero().tolist()]
    assert loss.item() == pytest.approx(float(np.mean(ce)), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Ordinary mistakes (one `error: ...` line, exit code 2, before building anything); Ctrl-C / SIGTERM
# ---------------------------------------------------------------------------------------------------------------------


EVAL_N = ("--eval-n must be an integer in [1, 561], got {} (held-out examples per task; the toy world has 561 "
          "held-out generation prompts)")
LM_WIDTH = ("--lm-width must be a multiple of 32 giving 1, 2, 3 or an even number of 32-dim attention heads (32, 64, "
            "96, 128, 192, 256, ...), got {} (half as many key/value heads must divide the heads)")
SIZE = ("--size must be a multiple of 32 in [64, 480], got {} (one AR token covers 32x32 px, the toy world needs 2x2 "
        "of them, and the evaluation's edits must fit the model's 512 positions)")


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "--resume: no training state in {run} yet (state.safetensors); start without --resume, or give "
                   "the --run-dir of the interrupted run"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["--seed", str(2**32)], f"--seed must be an integer in [0, 4294967295], got {2**32}"),
    (["--eval-n", "0"], EVAL_N.format(0)),
    (["--eval-n", "562"], EVAL_N.format(562)),  # heldout_prompts(562) would never return
    (["--eval", "{ckpt}", "--eval-n", "0"], EVAL_N.format(0)),
    (["--eval", "{ckpt}"], "{ckpt}/uniar_sample.json: field 'steps' must be an integer >= 1, got 0"),
    (["--device", "banana"], "--device 'banana' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cpu", "--dtype", "bfloat16"], "--dtype bfloat16 needs a CUDA GPU (training on the CPU or Apple's "
                                                 "MPS runs in float32); use --dtype float32 or auto"),
    (["--stage1-steps", "x"], "argument --stage1-steps: invalid int value: 'x'"),
    # flags that ran and wrote an unusable checkpoint
    (["--lm-width", "0"], LM_WIDTH.format(0)),
    (["--lm-width", "160"], LM_WIDTH.format(160)),  # 5 heads, 2 key/value heads
    (["--lm-layers", "0"], "--lm-layers must be an integer >= 1, got 0"),
    (["--stage1-steps", "-1"], "--stage1-steps must be an integer >= 1, got -1"),  # stage 1 was skipped
    (["--stage1-steps", "9999999999999999999999999999999999999999"], "--stage1-steps must be at most 2147483647, got 9999999999999999999999999999999999999999"),  # was a tqdm traceback
    (["--stage2-steps", "0"], "--stage2-steps must be an integer >= 1, got 0"),
    (["--flip-prob", "2"], "--flip-prob must be a finite number in [0, 0.5), got 2.0 (each bit of the decoder's "
                           "condition flipped with this probability; at 0.5 the condition carries nothing)"),
    (["--read-flip-prob", "0.5"], "--read-flip-prob must be a finite number in [0, 0.5), got 0.5 (each bit the AR "
                                  "model reads flipped with this probability; at 0.5 it reads noise)"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number > 0, got -1.0 (the largest gradient norm)"),
    (["--cfg-drop", "1"], "--cfg-drop must be a finite number in [0, 1), got 1.0 (the probability of dropping a "
                          "prompt's text; at 1 the model never sees one)"),
    (["--bsq-weight", "-0.1"], "--bsq-weight must be a finite number >= 0, got -0.1"),
    (["--edit-weight", "inf"], "--edit-weight must be a finite number >= 0, got inf"),
    (["--weight-decay", "2"], "--weight-decay must be a finite number in [0, 1], got 2.0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--lm-mlp", "0"], "--lm-mlp must be an integer >= 1, got 0"),
    (["--visual-decoder-depth", "0"], "--visual-decoder-depth must be an integer >= 1, got 0"),
    (["--vit-depth", "2"], "--vit-depth must be an integer >= 3, got 2 (the DeepStack levels tap blocks 0, 1 and 2)"),
    (["--dit-layers", "0"], "--dit-layers must be an integer >= 1, got 0"),
    (["--dit-width", "48"], "--dit-width must be a multiple of 32 >= 32, got 48 (attention heads of 32 dims)"),
    (["--stage2-lr", "0"], "--stage2-lr must be a finite number in (0, 1], got 0.0"),
    (["--decoder-cfg", "0.5"], "--decoder-cfg must be a finite number in [1, 100], got 0.5"),
    (["--stop-after", "0"], "--stop-after must be an integer >= 1, got 0 (steps in total)"),
    # flags that gave a traceback (--cfg and --temperature only after training, at the evaluation)
    (["--stage1-batch", "0"], "--stage1-batch must be an integer >= 1, got 0"),
    (["--stage1-lr", "nan"], "--stage1-lr must be a finite number in (0, 1], got nan"),
    (["--stage2-batch", "-2"], "--stage2-batch must be an integer >= 1, got -2"),
    (["--size", "0"], SIZE.format(0)),
    (["--size", "33"], SIZE.format(33)),
    (["--size", "512"], SIZE.format(512)),  # the evaluation's edits would not fit the 512 positions
    (["--dit-patch", "0"], "--dit-patch must be one of 1, 2, 4, 8, 16, 32, 64, got 0 (the decoder's pixel patches "
                           "must tile the 64-px image of --size)"),
    (["--size", "96", "--dit-patch", "64"], "--dit-patch must be one of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96, got "
                                            "64 (the decoder's pixel patches must tile the 96-px image of --size)"),
    (["--save-every", "0"], "--save-every must be an integer >= 1, got 0"),
    (["--vit-width", "33"], "--vit-width must be a multiple of 16 >= 16, got 33 (4 attention heads, each a multiple of "
                            "4 wide for the 2-D rotary embedding)"),
    (["--decoder-steps", "0"], "--decoder-steps must be an integer >= 1, got 0 (denoising steps)"),
    (["--cfg", "0"], "--cfg must be a finite number in [1, 100], got 0.0"),
    (["--temperature", "0"], "--temperature must be a finite number in [0.01, 100], got 0.0"),
    # a checkpoint save replaces everything in --out: never the run folder, nor a folder holding it
    (["--out", "{run}"], "--out {run} is --run-dir {run}: saving the checkpoint replaces everything in --out; pass "
                         "another --out (default: <run-dir>/checkpoint)"),
    (["--out", "{tmp}"], "--out {tmp} contains --run-dir {run}: saving the checkpoint replaces everything in --out; "
                         "pass another --out (default: <run-dir>/checkpoint)"),
])
def test_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, flags, message):
    """One `error:` line naming the flag and what is valid, exit code 2, before anything is built or loaded and
    before any folder is made."""
    def built(*a, **k):
        raise AssertionError("a check came after building / loading")

    monkeypatch.setattr(train, "build", built)
    monkeypatch.setattr(load_hf, "load_ar", built)
    ckpt = tmp_path / "ckpt"  # a folder with an AR config and an invalid uniar_sample.json
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "uniar_sample.json").write_text('{"steps": 0}')
    fill = lambda a: a.replace("{run}", str(tmp_path / "run")).replace("{ckpt}", str(ckpt)).replace("{tmp}",
                                                                                                  str(tmp_path))
    rc = train.main(["--smoke", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "o")] + [fill(a) for a in flags])
    assert (rc, capsys.readouterr().err) == (2, f"error: {fill(message)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no run folder, no checkpoint folder


def test_every_setting_has_a_range_that_its_defaults_meet():
    """Every TrainConfig field (every numeric flag) has an entry in the table of ranges; the defaults and the smoke
    configuration are inside them."""
    for tc in (train.TrainConfig(), train.TrainConfig.smoke()):
        assert list(train.config_limits(tc)) == [f.name for f in dataclasses.fields(train.TrainConfig)]
        train.check_config(tc)


def test_the_ranges_follow_the_config_math():
    """The edges of the ranges: settings at the accepted edge train a step of both stages and draw an image; the
    first ones outside fail inside the model code (which the checks now keep them from reaching). --size 480 is the
    largest side whose evaluation edits fit the model's 512 positions; 561 is the number of held-out prompts."""
    import pipeline as P

    tok = P.Tokenizer(toy.save_tokenizer(__import__("tempfile").mkdtemp()))
    base = dataclasses.replace(train.TrainConfig.smoke(), stage1_batch=1, stage2_batch=1)

    def one_step(**kw):
        tc = dataclasses.replace(base, **kw)
        vision, net, dec = train.build(tc, tok, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        l1, _ = train.TokenizerLoss(vision, dec, tc.bsq_weight, tc.flip_prob)(
            np.stack([toy.t2i_example(0, "train", 0, tc.size).image]), g)
        l2, _ = train.ARLoss(net, tok, tc)(0, 0, 1, g)
        (l1 + l2).backward()
        evaluate.generate(net.eval(), tok, dec.eval(), ["a red circle at the top left"], train.sample_defaults(tc))

    for ok in (dict(vit_width=16, lm_width=96, dit_width=32, dit_patch=64),  # 3 heads, 1 key/value head
               dict(vit_width=48, lm_width=192, size=96, dit_patch=3)):  # 6 heads, 3 key/value heads
        tc = dataclasses.replace(base, **ok)
        train.check_config(tc)
        one_step(**ok)
    for bad in (dict(vit_width=24), dict(lm_width=160), dict(dit_width=48), dict(dit_patch=3)):
        with pytest.raises(cli.UsageError):
            train.check_config(dataclasses.replace(base, **bad))
        with pytest.raises((RuntimeError, ValueError, AssertionError)):
            one_step(**bad)
    edits = toy.heldout_edits(evaluate.heldout_prompt_count())  # every edit an evaluation can make
    for size, fits in ((480, True), (512, False)):
        gh = size // 32
        longest = max(len(tok.encode(P.render_generation_prompt(e.instruction, gh, gh, gh * gh))) for e in edits)
        assert (longest + gh * gh <= 512) == fits, size
    assert train.SIZE_MAX == 480
    n = evaluate.heldout_prompt_count()
    assert n == 561 and len(set(toy.heldout_prompts(n))) == n


def test_device_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert train.main(["--smoke", "--device", "cuda", "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"error: --device cuda: CUDA is not available on this machine ({why}); use "
                                       "--device cpu (or auto)\n")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_the_state_and_resume_continues(tmp_path, sig):
    """Ctrl-C / SIGTERM once the first step is logged: the step in flight finishes, the state is saved, one line says
    where, exit code 130 / 143, no traceback; --resume then continues from the saved step."""
    import re
    import signal
    import time

    run = tmp_path / "run"
    flags = ["--smoke", "--stage1-steps", "200", "--stage1-batch", "2", "--no-eval", "--run-dir", str(run), "--out",
             str(tmp_path / "ckpt")]
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + flags, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    buf, deadline = b"", time.time() + 240
    while not re.search(rb" [1-9]\d*/200 ", buf):  # tqdm has logged a finished step
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk and time.time() < deadline, buf.decode()[-2000:]
        buf += chunk
    p.send_signal(getattr(signal, sig))
    _, rest = p.communicate(timeout=120)
    err = (buf + rest).decode()
    assert p.returncode == 128 + getattr(signal, sig), err[-2000:]
    assert "Traceback" not in err
    saved = len(history(run)["stage1"])
    assert saved >= 1
    assert err.endswith(f"interrupted by {sig}: training state saved in {run / files.STATE_FILE} (stage 1 step {saved}); "
                        "continue with the same flags and --resume\n")
    assert train.main(flags + ["--resume", "--stop-after", "1"]) == 0
    assert len(history(run)["stage1"]) == saved + 1


def wait_for_a_step(p, total: int) -> None:
    """Read the child's stderr until tqdm has logged a finished step (its state is saved by then with
    --save-every 1)."""
    import re
    import time

    buf, deadline = b"", time.time() + 240
    while not re.search(rb" [1-9]\d*/%d " % total, buf):
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk and time.time() < deadline, buf.decode()[-2000:]
        buf += chunk


def test_one_run_at_a_time_per_run_dir_and_per_out(tmp_path, capsys):
    """While a run trains, a second run given its --run-dir (to continue it, or to start over) or its --out is
    refused at once with one line naming the folder and the running process (exit code 2), and changes nothing;
    the first keeps training. Once the first is killed (SIGKILL: its lock file stays), a run takes the folder over
    and continues the first run's saved state."""
    import signal
    import time

    run, out = tmp_path / "run", tmp_path / "ckpt"
    flags = ["--smoke", "--stage1-steps", "200", "--stage1-batch", "2", "--save-every", "1", "--no-eval",
             "--run-dir", str(run), "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + flags, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_a_step(p, 200)
        busy = f"is in use by another run (process {p.pid}); wait for it to finish, or pass another"
        for extra in (["--resume"], ["--overwrite"]):
            t0 = time.monotonic()
            assert train.main(flags + extra + ["--stop-after", "1"]) == 2
            assert capsys.readouterr().err == f"error: --run-dir {run} {busy} --run-dir\n"
            assert time.monotonic() - t0 < 10  # no waiting for the other run
        other = ["--run-dir", str(tmp_path / "run2"), "--out", str(out), "--stop-after", "1"]
        assert train.main(flags[:-4] + other) == 2
        assert capsys.readouterr().err == f"error: --out {out} {busy} --out\n"
        assert not (tmp_path / "run2").exists()  # made for the attempt, left empty: removed
        assert p.poll() is None  # the first run trains on
        meta = files.run_state_meta(run)
        assert meta is not None
    finally:
        p.kill()
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    meta = files.run_state_meta(run)  # what the first run saved last
    saved = len(meta["history"]["stage1"])
    assert (run / files.RUN_LOCK).is_file() and saved >= 1
    assert train.main(flags + ["--resume", "--stop-after", "1"]) == 0  # the killed run's lock is taken over
    after = files.run_state_meta(run)
    assert after["run_id"] == meta["run_id"] and after["history"]["stage1"][:saved] == meta["history"]["stage1"]
    assert len(after["history"]["stage1"]) == saved + 1
    assert sorted(p.name for p in run.rglob(".*")) == [] and list(out.iterdir()) == []  # no lock left anywhere


TINY = ["--smoke", "--stage1-steps", "2", "--stage2-steps", "2", "--save-every", "1", "--no-eval"]


def disk_full(code: int, after: int = 0):
    """safetensors' save_file as it fails on a full disk (os error 28) or a read-only file system (30), as measured
    on a tmpfs: a SafetensorError naming the system's error, its own temporary file removed; the first `after` calls
    succeed."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > after:
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return save_file(tensors, filename, metadata=metadata)

    return save


def test_a_full_disk_during_a_state_save_is_one_line_and_keeps_the_last_state(tmp_path, capsys, monkeypatch):
    """The disk fills up at the second state save: one `error:` line naming the run folder, the reason and where the
    last state is (exit code 2, no traceback); that state is intact and nothing half written is left; with space
    again, --resume finishes the run."""
    import errno

    run = tmp_path / "run"
    flags = TINY + ["--run-dir", str(run), "--out", str(tmp_path / "ckpt")]
    monkeypatch.setattr(files, "save_file", disk_full(errno.ENOSPC, after=1))
    assert train.main(flags) == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f"error: cannot write {run}: No space left on device; the state saved before (stage 1 step 1) is intact in "
        f"{run / files.STATE_FILE}: free some space (or make the folder writable), then run the same command with "
        "--resume"]
    assert files.run_state_meta(run)["where"] == "stage 1 step 1"
    assert sorted(p.name for p in run.rglob(".*")) == [] and not (tmp_path / "ckpt").exists()
    monkeypatch.undo()
    assert train.main(flags + ["--resume", "--stop-after", "1"]) == 0
    assert files.run_state_meta(run)["where"] == "stage 1 step 2"


def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_checkpoint(smoke, tmp_path, capsys, monkeypatch):
    """The checkpoint cannot be written (a full disk, a read-only folder) when a finished run writes it again: one
    `error:` line naming the checkpoint folder and the reason (exit code 2); the checkpoint there is the previous
    one, byte for byte, with nothing staged left beside it, and the finished state stays for --resume."""
    import errno
    import shutil

    run, out = tmp_path / "run", tmp_path / "ckpt"
    shutil.copytree(smoke / "run", run)
    shutil.copytree(smoke / "ckpt", out)
    flags = ["--smoke", "--run-dir", str(run), "--out", str(out), "--no-eval", "--resume"]
    before = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    for code in (errno.ENOSPC, errno.EROFS):
        monkeypatch.setattr(load_hf, "save_file", disk_full(code))
        assert train.main(flags) == 2
        assert capsys.readouterr().err == (
            f"error: cannot write {out}: {os.strerror(code)}; the state saved before (both stages done) is intact in "
            f"{run / files.STATE_FILE}: free some space (or make the folder writable), then run the same command with "
            "--resume\n")
        assert {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
        assert sorted(p.name for p in run.rglob(".*")) == []
    assert files.run_state_meta(run)["where"] == "both stages done"  # --resume writes the checkpoint from it


def test_a_finished_run_saved_with_unusable_sampling_settings_can_be_completed(smoke, tmp_path):
    """A run that earlier versions let train to the end with --cfg 0 (or --temperature 0) crashed at the final
    sampling and refused any other --cfg on --resume. The sampling settings are bookkeeping now (they never change
    the weights): --resume with valid ones writes the checkpoint, with them in its uniar_sample.json."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke / "run", run)
    meta, tensors = files.load_run_state(run)
    meta["config"].update(cfg=0.0, temperature=0.0)  # as the earlier version saved it
    files.save_run_state(run, meta, tensors)
    assert train.main(["--smoke", "--run-dir", str(run), "--out", str(tmp_path / "ckpt"), "--no-eval", "--resume",
                       "--cfg", "2"]) == 0
    s = json.loads((tmp_path / "ckpt" / "uniar_sample.json").read_text())
    assert (s["cfg"], s["temperature"]) == (2.0, train.TrainConfig.smoke().temperature)


def test_bench_train_step_prints_where_a_step_goes():
    """`python bench.py train-step` (the issue's profiling command) prints, for each stage, seconds per step, the
    stage's projected minutes at the defaults, and a split whose parts add up to the step: rendering 32 images
    (stage 1) and 56 examples (stage 2: 16 per task, 8 conversations), 4 tower calls (one per task)."""
    import re

    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "train-step", "--steps", "1", "--warm-steps", "2",
                        "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("train-step: default TrainConfig, cpu, float32, 1 intra-op threads"), lines[0]
    tc = train.TrainConfig()
    stages = {}
    for line in lines[1:]:
        if m := re.fullmatch(r"  stage (\d): (\d+\.\d{3}) s/step -> (\d+\.\d) min for its (\d+) steps", line):
            stage = stages.setdefault(int(m[1]), {"s": float(m[2]), "min": float(m[3]), "steps": int(m[4]), "parts": {}})
        else:
            m = re.fullmatch(r"    (\S.*?) +(\d+\.\d{3}) s +(\d+\.\d)%(?: \((\d+) calls/step\))?", line)
            assert m, line
            stage["parts"][m[1]] = (float(m[2]), float(m[3]), int(m[4]) if m[4] else None)
    assert [(k, v["steps"]) for k, v in stages.items()] == [(1, tc.stage1_steps), (2, tc.stage2_steps)]
    for st in stages.values():
        assert abs(st["min"] - st["s"] * st["steps"] / 60) <= 0.05 + 0.0005 * st["steps"] / 60
        assert abs(sum(s for s, _, _ in st["parts"].values()) - st["s"]) <= 0.0005 * (len(st["parts"]) + 1)
        assert abs(sum(p for _, p, _ in st["parts"].values()) - 100) <= 0.05 * len(st["parts"])
    assert list(stages[1]["parts"]) == ["toy rendering", "tower calls", "rest of the forward", "backward", "optimizer"]
    assert list(stages[2]["parts"]) == ["toy rendering", "context building", "tower calls", "rest of the forward",
                                        "backward", "optimizer"]
    assert stages[1]["parts"]["toy rendering"][2] == tc.stage1_batch
    assert stages[2]["parts"]["toy rendering"][2] == 3 * tc.stage2_batch + tc.stage2_batch // 2
    assert stages[1]["parts"]["tower calls"][2] == 1 and stages[2]["parts"]["tower calls"][2] == 4
