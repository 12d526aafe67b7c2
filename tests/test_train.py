"""train.py: the smoke configuration trains every part (losses fall), writes a checkpoint load_hf reads, resumes with
the same loss sequence as an uninterrupted run, and runs data-parallel under torchrun with 2 processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bsq
import load_hf
import toy
import train
from conftest import ROOT


def history(run_dir):
    with open(run_dir / "state" / "state.json") as f:
        return json.load(f)["history"]


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

    state = load_file(str(smoke / "run" / "state" / "state.safetensors"))
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
    # the loaded model answers with the same tokens as the trained one would: one deterministic check end to end
    e = toy.qa_example(0, "heldout", 5)
    ans = train.answers(net, tok, e.image[None], [e.question])
    assert isinstance(ans[0], str)
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
    assert train.main(args + ["--resume"]) == 0
    got, want = history(run), history(smoke / "run")
    for stage in ("stage1", "stage2"):
        assert [r["loss"] for r in got[stage]] == [r["loss"] for r in want[stage]], stage


def test_resume_refuses_another_configuration(smoke, tmp_path):
    import shutil

    shutil.copytree(smoke / "run", tmp_path / "run")
    with pytest.raises(SystemExit, match="another configuration"):
        train.main(["--smoke", "--seed", "1", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "c"),
                    "--resume"])
    with pytest.raises(ValueError, match="no training state"):
        train.main(["--smoke", "--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--resume"])


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
    assert sum(p.numel() for p in net.parameters()) > 0


def test_eval_command_prints_one_json_line(smoke):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval", str(smoke / "ckpt"), "--eval-n", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    scores = json.loads(lines[0])
    assert scores["n"] == 4 and all(0.0 <= scores[k] <= 1.0 for k in ("generation", "understanding", "editing"))


def test_eval_command_rejects_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_to_pixels_matches_the_processor():
    vc = train.vision_config(train.TrainConfig.smoke())
    imgs = np.stack([toy.t2i_example(i).image for i in range(3)])
    pv, grid = train.to_pixels(imgs, vc)
    for i, im in enumerate(imgs):
        p, g = bsq.preprocess_image(im, resize=False)
        n = p.shape[0]
        torch.testing.assert_close(pv[i * n:(i + 1) * n], p, rtol=0, atol=0)
        assert grid[i].tolist() == g[0].tolist()


def test_lr_schedule():
    assert train.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert train.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_noisy_reading_flips_what_the_llm_reads_and_nothing_else():
    vision = bsq.VisionModel(bsq.VisionConfig.tiny()).eval()
    L, U, d = vision.cfg.levels, vision.cfg.merge_unit, vision.cfg.bsq_dim
    bits = torch.randint(0, 2, (6, L, U, d), generator=torch.Generator().manual_seed(0))
    clean_main, clean_deep = vision.bits_to_llm_features(bits)
    g = torch.Generator().manual_seed(1)
    with train.noisy_reading(vision, 0.1, g):
        noisy_main, noisy_deep = vision.bits_to_llm_features(bits)
    # the same draw, done by hand: each bit flipped with probability 0.1
    flip = torch.rand(bits.shape, generator=torch.Generator().manual_seed(1)) < 0.1
    assert 0.05 < flip.float().mean() < 0.15
    want_main, want_deep = vision.bits_to_llm_features(torch.where(flip, 1 - bits, bits))
    torch.testing.assert_close(noisy_main, want_main, rtol=0, atol=0)
    for a, b in zip(noisy_deep, want_deep):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(noisy_main, clean_main)
    # outside the block (and with p = 0) the reading is clean again; encode_bits (the targets) is never touched
    after_main, _ = vision.bits_to_llm_features(bits)
    torch.testing.assert_close(after_main, clean_main, rtol=0, atol=0)
    with train.noisy_reading(vision, 0.0, g):
        torch.testing.assert_close(vision.bits_to_llm_features(bits)[0], clean_main, rtol=0, atol=0)
    assert "bits_to_llm_features" not in vars(vision)
