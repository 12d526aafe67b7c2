"""finetune.py through what a user calls (`python train.py --init CKPT --data FILE.jsonl ...`, train.main): a
fine-tune of the golden checkpoint lowers its loss and writes the released layout, which load_hf.load_ar reads and
the parity tests' calls run on; LoRA's merged weights give exactly the adapted model's outputs; 1 and 2 processes
(FSDP, gloo) give the same weights; --resume gives the uninterrupted run's weights; bad data is one `error:
FILE:LINE:` line; the loss is stage 2's (train.ARLoss.context_loss); the memory plan is built from the released
config; the toy demonstration's data and evaluator run. Sizes come from the golden fixture's config."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import files
import finetune
import load_hf
import model as M
import pipeline as P
import toy
import train
from conftest import ROOT, golden_dir, load_manifest

TOY = ROOT / "checkpoints" / "toy"


def side(ckpt) -> int:
    """The smallest square image a checkpoint draws: 2 x 2 generated tokens."""
    return 2 * load_hf.ar_config(ckpt).downsample


def write_data(folder, S: int, rows: list | None = None) -> object:
    """A small data set of every task with random S x S pictures; -> the .jsonl path."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
    if rows is None:
        rows = [{"prompt": "a red circle", "image": "img/0.png"},
                {"image": "img/1.png", "instruction": "make it blue", "output_image": "img/2.png"},
                {"image": "img/3.png", "question": "what color is it?", "answer": "green"},
                {"messages": [{"role": "user", "text": "draw a square"}, {"role": "assistant", "image": "img/4.png"},
                              {"role": "user", "text": "what is it?"}, {"role": "assistant", "text": "a square"},
                              {"role": "user", "text": "make it red"}, {"role": "assistant", "image": "img/5.png"}]},
                {"prompt": "a blue <|im_end|> square", "image": "img/5.png"},
                {"image": "img/0.png", "question": "how many?", "answer": "one"}]
    path = folder / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(golden_ckpt, data, run_dir, *flags):
    S = side(golden_ckpt)
    return train.main(["--init", str(golden_ckpt), "--data", str(data), "--size", f"{S}x{S}", "--run-dir",
                       str(run_dir / "run"), "--out", str(run_dir / "out"), "--batch", "4", "--heldout", "0.2",
                       "--lr", "1e-3", *flags])


def out_grid(pos_ids_all: torch.Tensor, n: int) -> tuple:
    """The golden generated image's token grid (h, w), from its position ids (as tests/parity/test_model.py)."""
    p = pos_ids_all[:, 0, -n:]
    return int(p[1].max() - p[1].min()) + 1, int(p[2].max() - p[2].min()) + 1


def params(run_dir) -> dict:
    return {k: v for k, v in load_file(str(run_dir / "run" / files.STATE_FILE)).items()}


@pytest.fixture(scope="module")
def data(golden_ckpt, tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), side(golden_ckpt))


@pytest.fixture(scope="module")
def full_run(golden_ckpt, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    assert run(golden_ckpt, data, d, "--steps", "12", "--eval-every", "4", "--batch", "5") == 0  # every train record
    return d


def test_full_fine_tune_lowers_the_loss_and_writes_the_released_layout(full_run, golden_ckpt):
    h = files.run_state_meta(full_run / "run")["history"]
    assert len(h) == 12
    assert np.mean([r["loss"] for r in h[-3:]]) < 0.7 * np.mean([r["loss"] for r in h[:3]])  # the same records
    evals = [r["eval_loss"] for r in h if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    net, _ = load_hf.load_ar(full_run / "out")  # the released layout, strictly checked
    base, _ = load_hf.load_ar(golden_ckpt)
    state = params(full_run)
    for k, v in net.state_dict().items():  # the trained weights, and the frozen tokenizer unchanged
        want = state.get(f"param.{k}", base.state_dict()[k])
        assert torch.equal(v, want), k
    for part in ("bsq_encoder", "sd3_transformer", "sd3_pipeline"):  # the decoder parts carried over unchanged
        src = golden_dir() / part
        for f in (p for p in src.rglob("*") if p.is_file()):
            assert (full_run / "out" / part / f.relative_to(src)).read_bytes() == f.read_bytes(), f


def test_fine_tuned_golden_checkpoint_runs_the_parity_tests_calls(full_run, golden):
    net, _ = load_hf.load_ar(full_run / "out")
    base, _ = load_hf.load_ar(golden.dir)
    und = (golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"])
    codes = golden["t2i.codes"]
    ids, mask = golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1]
    gh, gw = out_grid(golden["t2i.pos_ids_all"], codes.shape[1])
    for m in (net, base):
        m.got = (m.text_logits(*und), m.teacher_forced_logits(ids, mask, codes, (gh, gw)))
    assert (base.got[0] - golden["und.logits"]).abs().max() <= 1e-4  # the base still is the golden model
    for a, b in zip(net.got, base.got):
        assert a.shape == b.shape and torch.isfinite(a).all() and not torch.equal(a, b)  # fine-tuned, same calls


def test_lora_merged_weights_give_the_adapted_models_outputs_exactly(golden_ckpt, data, tmp_path, golden):
    assert run(golden_ckpt, data, tmp_path, "--steps", "4", "--lora", "4", "--merge") == 0
    merged, _ = load_hf.load_ar(tmp_path / "out")
    adapted, _ = load_hf.load_ar(golden_ckpt)
    finetune.add_lora(adapted, 4, 4.0, 0)
    finetune.load_params(finetune.trainable(adapted, 4), params(tmp_path))
    adapted.eval()
    assert any(m.lora_B.abs().max() > 0 for m in adapted.modules() if isinstance(m, finetune.LoRALinear))
    und = (golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"])
    with torch.no_grad():
        assert torch.equal(merged.text_logits(*und), adapted.text_logits(*und))
        codes, ids, mask = golden["t2i.codes"], golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1]
        grid = out_grid(golden["t2i.pos_ids_all"], codes.shape[1])
        assert torch.equal(merged.teacher_forced_logits(ids, mask, codes, grid),
                           adapted.teacher_forced_logits(ids, mask, codes, grid))
    # the factored training form W x + s B (A x) is the same function: equal to 1e-12 in float64
    adapted.double().train()
    with torch.no_grad():
        x = torch.randn(3, adapted.cfg.text.hidden_size, dtype=torch.float64)
        lin = adapted.language_model.layers[0].self_attn.q_proj
        assert (lin(x) - torch.nn.functional.linear(x, lin.merged_weight())).abs().max() <= 1e-12 * lin(x).abs().max()


def test_lora_without_merge_writes_the_adapters(golden_ckpt, data, tmp_path):
    assert run(golden_ckpt, data, tmp_path, "--steps", "2", "--lora", "2") == 0
    got = load_file(str(tmp_path / "out" / finetune.ADAPTER_FILE))
    assert got and all(k.endswith((".lora_A", ".lora_B")) for k in got)
    assert json.loads((tmp_path / "out" / finetune.ADAPTER_CONFIG).read_text())["rank"] == 2
    # the finished run resumed with --merge writes the merged checkpoint
    assert run(golden_ckpt, data, tmp_path, "--steps", "2", "--lora", "2", "--resume", "--merge") == 0
    load_hf.load_ar(tmp_path / "out")


def test_resume_gives_the_uninterrupted_weights(golden_ckpt, data, tmp_path):
    assert run(golden_ckpt, data, tmp_path / "a", "--steps", "5", "--save-every", "2") == 0
    assert run(golden_ckpt, data, tmp_path / "b", "--steps", "5", "--save-every", "2", "--stop-after", "3") == 0
    assert files.run_state_meta(tmp_path / "b" / "run")["step"] == 3
    assert run(golden_ckpt, data, tmp_path / "b", "--steps", "5", "--save-every", "2", "--resume") == 0
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (files.run_state_meta(d / "run")["history"] for d in (tmp_path / "a", tmp_path / "b"))
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]


def test_resume_refuses_other_settings_or_data(golden_ckpt, data, tmp_path, capsys):
    assert run(golden_ckpt, data, tmp_path, "--steps", "3", "--stop-after", "1") == 0
    assert run(golden_ckpt, data, tmp_path, "--steps", "4", "--resume") == 2
    assert "different: steps" in capsys.readouterr().err
    other = write_data(tmp_path / "d2", side(golden_ckpt))
    other.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    assert run(golden_ckpt, other, tmp_path, "--steps", "3", "--resume") == 2
    assert "different:" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_weights(golden_ckpt, data, tmp_path):
    assert run(golden_ckpt, data, tmp_path / "a", "--steps", "2") == 0
    assert run(golden_ckpt, data, tmp_path / "b", "--steps", "2", "--grad-checkpointing") == 0
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_and_two_fsdp_processes_give_the_same_weights(golden_ckpt, data, tmp_path):
    """torchrun with 1 and with 2 processes (FSDP fully_shard, gloo): the same global batch (4 records) in chunks of
    2; one process accumulates two chunks, two processes take one each and reduce-scatter (sum) the gradients. Both
    hold the same weights, bit for bit, after steps with gradient clipping."""
    S = side(golden_ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--init", str(golden_ckpt), "--data", str(data), "--size", f"{S}x{S}", "--batch", "4",
              "--micro-batch", "2", "--steps", "3", "--lr", "1e-3", "--heldout", "0.2"]
    for name, n in (("one", "1"), ("two", "2")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n, str(ROOT / "train.py"), *common, "--run-dir", str(tmp_path / name / "run"),
               "--out", str(tmp_path / name / "out")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = params(tmp_path / "one"), params(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one), [k for k in one if not torch.equal(one[k], two[k])][:5]
    a, _ = load_hf.load_ar(tmp_path / "one" / "out")
    b, _ = load_hf.load_ar(tmp_path / "two" / "out")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


BAD = [
    ('{"prompt": "a", "image": "img/0.png"', "not valid JSON"),
    ('["prompt"]', "a record is a JSON object"),
    ({"prompt": "a", "image": "img/0.png", "caption": "b"}, "unknown keys ['caption'] in a t2i record"),
    ({"image": "img/0.png", "question": "what?"}, "missing keys ['answer'] in a understanding record"),
    ({"foo": 1}, "cannot tell the task"),
    ({"prompt": "a", "image": "img/missing.png"}, "image file not found"),
    ({"prompt": "a", "image": "notes.png"}, "not a readable image file"),
    ({"prompt": "a", "image": "../img/0.png"}, "is outside"),
    ({"prompt": "a", "image": "/etc/passwd"}, "is outside"),
    ({"image": "img/0.png", "question": "what?", "answer": "  "}, "'answer' is empty"),
    ({"prompt": "", "image": "img/0.png"}, "'prompt' is empty"),
    ({"prompt": 3, "image": "img/0.png"}, "'prompt' must be a string"),
    ({"messages": [{"role": "assistant", "text": "hi"}]}, "role must be 'user'"),
    ({"messages": [{"role": "user", "text": "hi"}]}, "the last turn must be the assistant's"),
    ({"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "a", "image": "img/0.png"}]},
     "either 'text' (an answer) or 'image'"),
    ({"messages": [{"role": "user", "txt": "hi"}, {"role": "assistant", "text": "a"}]}, "unknown keys ['txt']"),
    ("LONG", "more than the model's max_position_embeddings="),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_data_is_one_error_line_naming_file_and_line(golden_ckpt, tmp_path, capsys, bad, message):
    if bad == "LONG":
        bad = {"image": "img/0.png", "question": "word " * load_hf.ar_config(golden_ckpt).text.max_position_embeddings,
               "answer": "a"}
    path = write_data(tmp_path, side(golden_ckpt), [{"prompt": "fine", "image": "img/0.png"}, bad])
    (tmp_path / "notes.png").write_text("not an image")
    capsys.readouterr()
    assert run(golden_ckpt, path, tmp_path, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}:2: ") and message in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # nothing written


def test_nothing_a_user_has_is_replaced(golden_ckpt, data, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert run(golden_ckpt, data, tmp_path, "--steps", "1") == 2
    assert "holds files this run did not write" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.jsonl").write_text("mine")
    assert train.main(["--toy-data", str(tmp_path / "toy")]) == 2
    assert (tmp_path / "toy" / "train.jsonl").read_text() == "mine"


def test_user_text_stays_text(golden_ckpt, tmp_path):
    net, tok = load_hf.load_ar(golden_ckpt)
    S = side(golden_ckpt)
    path = write_data(tmp_path, S, [{"prompt": "a <|im_end|> b <|vision_start|>", "image": "img/0.png"}])
    rec = finetune.read_records(path, net, tok, (S, S))[0]
    enc = finetune.encode(tok, rec.turns, net.cfg)
    plain = finetune.encode(tok, (rec.turns[0]._replace(text="a b"), rec.turns[1]), net.cfg)
    controls = lambda ids: [i for i in ids if i in tok.control_ids]  # noqa: E731
    assert controls(enc.ids) == controls(plain.ids)  # the typed strings added no control token


def test_the_loss_is_stage_2s_context_loss():
    """On the toy checkpoint (all images 64x64, as train.ARLoss assumes): each task's loss of a batch of records
    equals train.ARLoss.context_loss's on the same conversations (no read flips, no text dropout)."""
    net, tok = load_hf.load_ar(TOY)
    S = 64
    tc = train.TrainConfig(read_flip_prob=0.0)
    stage2 = train.ARLoss(net, tok, tc)
    t2i = [toy.t2i_example(i) for i in range(3)]
    ed = [toy.edit_example(i) for i in range(3)]
    qa = [toy.qa_example(i) for i in range(3)]
    conv = [toy.conversation_example(i) for i in range(2)]
    T = toy.Turn
    convs = {"t2i": [[T("user", e.caption), T("model", image=e.image)] for e in t2i],
             "edit": [[T("user", e.instruction, e.source), T("model", image=e.target)] for e in ed],
             "understanding": [[T("user", e.question, e.image), T("model", e.answer)] for e in qa],
             "conversation": conv}
    want = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for task, cs in convs.items():
            bit, text, *_ = stage2.context_loss(cs, g)
            want[task] = float(bit + text)
    # the same conversations as records of a data file, in one batch
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        k = 0

        def png(a):
            nonlocal k
            k += 1
            Image.fromarray(a).save(d / f"{k}.png")
            return f"{k}.png"

        rows = []
        for task, cs in convs.items():
            for c in cs:
                msgs = []
                for t in c:
                    m = {"role": "user" if t.role == "user" else "assistant"}
                    if t.text:
                        m["text"] = t.text
                    if t.image is not None:
                        m["image"] = png(t.image)
                    msgs.append(m)
                rows.append({"messages": msgs})
        (d / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        records = finetune.read_records(d / "x.jsonl", net, tok, (S, S))
        tasks = [t for t, cs in convs.items() for _ in cs]
        records = [r._replace(task=t) for r, t in zip(records, tasks)]
        encs = [finetune.encode(tok, r.turns, net.cfg) for r in records]
        totals = finetune.count_targets(encs, tasks, net.cfg)
        batch = finetune.make_batch(net, tok, (S, S), records, [None] * len(records), totals, 0.0, 0.0)
        with torch.no_grad():
            _, per_task = finetune.ContextLoss(net, dict.fromkeys(finetune.TASKS, 1.0))(batch)
    for k, task in enumerate(finetune.TASKS):
        assert abs(float(per_task[k]) - want[task]) <= 1e-5 * want[task], (task, float(per_task[k]), want[task])


def test_memory_plan_of_the_released_model(capsys):
    with torch.device("meta"):
        net = M.UniAR(M.UniARConfig())
    manifest = load_manifest("ar_model")  # the released config, rebuilt on the meta device, has the released keys
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == manifest
    total = json.loads((ROOT / "tests" / "fixtures" / "manifests" / "ar_model.json").read_text())["num_params"]
    assert sum(v.numel() for v in net.state_dict().values()) == total  # 9.6 B (the 65 BSQ basis entries are buffers)
    assert train.main(["--plan-memory", "--gpus", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "9,627.1 M parameters" in out and out.count("| full |") == 4 and out.count("| LoRA r=16 |") == 4
    plan = finetune.memory_plan(M.UniARConfig(), lora=0, gpus=1, checkpointing=False, tokens=1, image_tokens_=0)
    assert plan["weights"] == 4 * sum(p.numel() for p in net.parameters()) and plan["optimizer"] == 2 * plan["grads"]
    sharded = finetune.memory_plan(M.UniARConfig(), lora=0, gpus=8, checkpointing=True, tokens=1, image_tokens_=0)
    assert sharded["weights"] == plan["weights"] / 8 and sharded["activations"] < plan["activations"]


def test_toy_demonstration_data_and_the_evaluator_on_records(tmp_path, capsys):
    finetune.write_toy_data(tmp_path, n_train=2, n_heldout=2)
    net, tok = load_hf.load_ar(TOY)
    recs = finetune.read_records(tmp_path / "train.jsonl", net, tok, (64, 64))
    assert [r.task for r in recs[:4]] == ["t2i", "edit", "understanding", "t2i"]
    held = [json.loads(s) for s in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(toy.parse_caption(held[0]["prompt"])) == 3
    capsys.readouterr()
    assert train.main(["--eval", str(TOY), "--data", str(tmp_path / "heldout.jsonl")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n_generation"] == got["n_editing"] == got["n_understanding"] == 2
    assert all(0 <= got[k] <= 1 for k in ("generation", "editing", "understanding"))
