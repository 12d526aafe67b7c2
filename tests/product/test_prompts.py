"""`generate_batch.py --prompts`: the official batch launcher's file format and output layout, editing records, resume
after a kill, data parallel under torchrun, images that depend only on (seed, prompt index, sample index), and
`train.py --score` reading a run back with the toy evaluator."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate_batch
import toy
import cli
import evaluate
import train
from conftest import ROOT

TOY = ROOT / "checkpoints" / "toy"
RECORDS = [  # the official format; idx may be anything unique, meta is copied through
    {"idx": 0, "prompt": "a blue circle at the bottom right", "meta": {"tag": "single_object"}},
    {"idx": 7, "prompt": "a red square at the top left and a green triangle at the bottom right",
     "meta": {"tag": "two_object", "source": {"id": "x"}}},
    {"idx": 2, "prompt": "a yellow triangle at the top right", "meta": {"tag": "single_object"}},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(args, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "generate_batch.py")] + [str(a) for a in args], capture_output=True,
                       text=True, cwd=cwd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The records, 2 samples each, batch 1, one process: the run every other one must reproduce."""
    d = tmp_path_factory.mktemp("prompts")
    prompts = write_jsonl(d / "p.jsonl", RECORDS)
    r = run(["--ckpt", TOY, "--prompts", prompts, "--samples-per-prompt", 2, "--batch-size", 1, "--out", d / "out"])
    return d, prompts, files(d / "out" / "p"), r


def test_layout_and_metadata_are_the_official_ones(reference):
    """<out>/<run>/<idx:05d>/samples/<k:04d>.png and <idx:05d>/metadata.json holding the record, every written path
    printed once; the images draw their prompts (toy evaluator)."""
    d, _, got, r = reference
    want = {f"{rec['idx']:05d}/{name}" for rec in RECORDS for name in ("metadata.json", "samples/0000.png",
                                                                        "samples/0001.png")}
    assert set(got) == want | {generate_batch.RUN_SETTINGS}  # and the settings the samples were drawn with (--resume)
    toy_settings = cli.read_sample_settings(TOY, required=True, defaults={})
    assert json.loads(got[generate_batch.RUN_SETTINGS]) == {
        "ckpt": str(TOY.resolve()), "seed": 0, "ar_size": list(toy_settings["ar_size"]), "dtype": "float32",
        "image_key": None, **{k: toy_settings[k] for k in ("cfg", "temperature", "upsample", "steps", "decoder_cfg")}}
    for rec in RECORDS:
        assert json.loads(got[f"{rec['idx']:05d}/metadata.json"]) == rec
    assert sorted(r.stdout.split()) == sorted(str(d / "out" / "p" / n) for n in want if n.endswith(".png"))
    correct = [toy.score_image(np.asarray(Image.open(d / "out" / "p" / n).convert("RGB")), rec["prompt"])["correct"]
               for rec in RECORDS for n in (f"{rec['idx']:05d}/samples/0000.png", f"{rec['idx']:05d}/samples/0001.png")]
    assert sum(correct) >= 4  # the toy model draws most of them right (held-out and training combinations mixed)
    # a plain text file: one prompt per line, idx = its position
    txt = d / "plain.txt"
    txt.write_text("a blue circle at the bottom right\n\na yellow triangle at the top right\n")
    run(["--ckpt", TOY, "--prompts", txt, "--out", d / "txt"])
    assert json.loads((d / "txt" / "plain" / "00001" / "metadata.json").read_text()) == {
        "idx": 1, "prompt": "a yellow triangle at the top right"}
    assert (d / "txt" / "plain" / "00000" / "samples" / "0000.png").read_bytes() == got["00000/samples/0000.png"]


def test_same_files_for_any_batch_size_and_process_count(reference, tmp_path):
    """Batch 4 in one process, and batch 2 in each of 2 torchrun processes (gloo), write byte-identical files;
    the two processes together write every sample exactly once."""
    d, prompts, want, _ = reference
    run(["--ckpt", TOY, "--prompts", prompts, "--samples-per-prompt", 2, "--batch-size", 4, "--out", tmp_path / "b4"])
    assert files(tmp_path / "b4" / "p") == want
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "generate_batch.py"), "--ckpt", str(TOY), "--prompts", str(prompts),
                        "--samples-per-prompt", "2", "--batch-size", "2", "--out", str(tmp_path / "dp")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(tmp_path / "dp" / "p") == want
    written = r.stdout.split()  # each process prints the paths it wrote
    assert sorted(written) == sorted(str(tmp_path / "dp" / "p" / n) for n in want if n.endswith(".png"))


def test_resume_after_a_kill(reference, tmp_path):
    """Killed (SIGKILL) at random file-system calls, then rerun with --resume: every PNG present is whole at every
    point, finished samples are never written again, the temporary files of killed runs are gone once a run
    finishes, and the run ends with the uninterrupted run's files. A rerun without --resume over finished samples
    refuses."""
    d, prompts, want, _ = reference
    out, log = tmp_path / "out", tmp_path / "calls.log"
    args = ["generate_batch", "--ckpt", str(TOY), "--prompts", str(prompts), "--samples-per-prompt", "2",
            "--batch-size", "2", "--out", str(out)]
    rng = random.Random(1)
    finished = {}
    for attempt in range(4):
        k = rng.randint(10, 40) if attempt < 3 else 0
        resume = ["--resume"] if (out / "p").exists() else []
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "killpoints.py"), str(k), str(log)] + args + resume,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode in (0, -9), r.stderr[-2000:]
        now = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("[!.]*.png")}
        assert all(now[p] == v for p, v in finished.items())  # nothing finished was rewritten
        finished = now
        for p in now:
            Image.open(p).load()  # every PNG present is whole
        if r.returncode == 0:  # a run that finished cleaned what the killed ones left (its settings record stays)
            assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != generate_batch.RUN_SETTINGS]
    assert files(out / "p") == want
    r = run(["--ckpt", TOY, "--prompts", prompts, "--samples-per-prompt", 2, "--out", out], check=False)
    assert (r.returncode, r.stderr) == (2, f"error: {out / 'p'} already holds 6 of this file's samples; pass --resume "
                                           "to skip them, or another --run-name / --out\n")


def test_editing_records_find_their_input_image(tmp_path):
    """--image-root / --image-key as in the official launcher (the path in meta, or meta.meta): each sample is the
    edit pipeline.generate_bits + the decoder give for that picture, instruction and the sample's own seed."""
    import load_hf
    import pipeline as P

    pic = toy.render(toy.parse_caption("a red square at the top left"))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(pic).save(tmp_path / "imgs" / "a.png")
    recs = [{"idx": 0, "prompt": "make the red square blue", "meta": {"image": "a.png"}},
            {"idx": 1, "prompt": "move the red square to the bottom right", "meta": {"meta": {"image": "a.png"}}}]
    prompts = write_jsonl(tmp_path / "e.jsonl", recs)
    run(["--ckpt", TOY, "--prompts", prompts, "--image-root", tmp_path / "imgs", "--image-key", "image", "--out",
         tmp_path / "out", "--seed", 3])
    net, tok = load_hf.load_ar(TOY)
    dec = load_hf.load_decoder(TOY)
    s = cli.read_sample_settings(TOY, required=True, defaults={})
    for rec in recs:
        seed = [P.sample_seed(3, rec["idx"], 0)]
        bits = P.generate_bits(net, tok, [rec["prompt"]], ar_height=64, ar_width=64, cfg_scale=s["cfg"],
                               temperature=s["temperature"], seed=seed, input_images=[tmp_path / "imgs" / "a.png"])
        want = dec.decode(bits, 64, 64, upsampling_ratio=s["upsample"], steps=s["steps"], guidance=s["decoder_cfg"],
                          seed=seed)[0].numpy()
        got = np.asarray(Image.open(tmp_path / "out" / "e" / f"{rec['idx']:05d}" / "samples" / "0000.png"))
        assert np.array_equal(got, want), rec


@pytest.mark.parametrize("content, flags, message", [
    ('{"idx": 0, "prompt": "a"}\n{"prompt": }\n', [], "--prompts {f} line 2: not JSON (Expecting value)"),
    ('{"idx": 0, "prompt": "a"}\n{"idx": 0, "prompt": "b"}\n', [], "--prompts {f} line 2: idx 0 appears twice"),
    ('{"idx": -1, "prompt": "a"}\n', [], "--prompts {f} line 1: 'idx' must be an integer in [0, 9223372036854775807], "
                                        "got -1"),
    pytest.param('{"idx": %s, "prompt": "a"}\n' % ("9" * 300), [], "--prompts {f} line 1: 'idx' must be an integer in "
                 "[0, 9223372036854775807], got 99999999999999999999... (300 characters)", id="idx-300-digits"),
    pytest.param('{"idx": %s, "prompt": "a"}\n' % ("9" * 5000), [], "--prompts {f} line 1: not JSON the reader takes "
                 "(Exceeds the limit (4300 digits) for integer string conversion)", id="idx-5000-digits"),
    pytest.param('{"idx": 0, "prompt": "a", "meta": %s}\n' % ("[" * 100000 + "]" * 100000), [], "--prompts {f} line 1: "
                 "the record nests lists / objects more than 100 levels deep; flatten it (its meta is copied to "
                 "metadata.json)", id="meta-100000-deep"),
    pytest.param('{"idx": 0, "prompt": "a"}\n{"idx": 1, "prompt": "b", "meta": %s}\n' % ('{"a": ' * 100 + "0" +
                 "}" * 100), [], "--prompts {f} line 2: the record nests lists / objects more than 100 levels deep; "
                 "flatten it (its meta is copied to metadata.json)", id="meta-101-deep"),
    ('{"idx": 0}\n', [], "--prompts {f} line 1: 'prompt' must be a non-empty string"),
    ('{"idx": 0, "prompt": "a", "meta": {"img": "x.png"}}\n', ["--image-root", "{d}", "--image-key", "img"],
     "--prompts {f} line 1: the input image of record idx 0 does not exist: {d}/x.png (--image-root {d})"),
    ('{"idx": 0, "prompt": "a", "img": "good.png"}\n\n{"idx": 3, "prompt": "b", "meta": {"img": "bad.png"}}\n',
     ["--image-root", "{d}", "--image-key", "img"],
     "--prompts {f} line 3: the input image of record idx 3: {d}/bad.png is not a readable image file ({pil})"),
    ('{"idx": 0, "prompt": "a"}\n', ["--image-root", "{d}", "--image-key", "img"],
     "--image-key 'img': record idx 0 has no such field (looked in meta and at the top level)"),
    ('{"idx": 0, "prompt": "a"}\n', ["--image-root", "{d}"], "--image-root and --image-key go together (editing "
                                                              "records)"),
    ('{"idx": 0, "prompt": "a"}\n', ["--prompt", "b"], "--prompts runs a prompt file; drop --prompt"),
    ('{"idx": 0, "prompt": "a"}\n', ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    ('{"idx": 0, "prompt": "a"}\n', ["--samples-per-prompt", "10001"],
     "--samples-per-prompt must be an integer in [1, 10000], got 10001 (samples are named <k:04d>.png)"),
    ('{"idx": 0, "prompt": "a"}\n', ["--sampler", "kernel"], "--sampler kernel: --prompts draws each image from its "
     "own seeds (the same image in any batch), which takes --sampler multinomial"),
] + [  # the run folder is one folder inside --out: nothing is ever written outside it
    ('{"idx": 0, "prompt": "a"}\n', ["--run-name", name], f"--run-name {name!r} must be one plain folder name: not "
     "empty, no '/' or '\\', no control characters, not starting with '.' (the run is written to <out>/<run-name>)")
    for name in ["../x", "{d}/abs", "..", ".", "", "a/b", "a\\b", ".hidden", "a\nb"]
])
def test_prompt_file_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, content, flags, message):
    import load_hf

    monkeypatch.setattr(load_hf, "load_ar", lambda *a, **k: pytest.fail("loaded before checking"))
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    (tmp_path / "bad.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    try:
        Image.open(tmp_path / "bad.png")
    except Exception as e:
        pil = str(e)
    fill = lambda x: x.replace("{f}", str(f)).replace("{d}", str(tmp_path)).replace("{pil}", pil)
    assert generate_batch.main(["--ckpt", str(TOY), "--prompts", str(f), "--out", str(tmp_path / "o")] +
                               [fill(a) for a in flags]) == 2
    assert capsys.readouterr().err == f"error: {fill(message)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "good.png", "p.jsonl"]  # nothing written, anywhere


@pytest.mark.parametrize("name, run", [("...jsonl", ".."), ("..jsonl", "."), (".hidden.jsonl", ".hidden")])
def test_prompt_file_name_that_is_no_folder_name_needs_run_name(tmp_path, capsys, monkeypatch, name, run):
    """The run folder defaults to the prompt file's name; a file named `...jsonl` used to write its run into the
    parent of --out (run name '..'). Such a name is refused before loading, asking for --run-name."""
    import load_hf

    monkeypatch.setattr(load_hf, "load_ar", lambda *a, **k: pytest.fail("loaded before checking"))
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / name
    f.write_text('{"idx": 0, "prompt": "a blue circle at the bottom right"}\n')
    assert generate_batch.main(["--ckpt", str(TOY), "--prompts", str(f), "--out", str(tmp_path / "in" / "o")]) == 2
    assert capsys.readouterr().err == (
        f"error: --prompts {f}: its name gives the run folder {run!r}, which is not one plain folder name: not empty, "
        "no '/' or '\\', no control characters, not starting with '.'; pass --run-name NAME\n")
    assert [p.name for p in tmp_path.rglob("*")] == ["in", name]


def test_resume_refuses_another_prompt_file_or_other_settings(reference, tmp_path, capsys, monkeypatch):
    """--resume over samples drawn from another prompt file, or with another seed / cfg / steps, used to keep the old
    PNGs under the new metadata (a run scoring 1.0 then read 0.0). The run folder records the settings (and each
    record its metadata.json): a difference is one error line before loading, and nothing in the folder changes."""
    import shutil

    import load_hf

    d, prompts, want, _ = reference
    shutil.copytree(d / "out", tmp_path / "out")
    run_dir = tmp_path / "out" / "p"
    monkeypatch.setattr(load_hf, "load_ar", lambda *a, **k: pytest.fail("loaded before checking"))
    same = ["--ckpt", str(TOY), "--samples-per-prompt", "2", "--batch-size", "1", "--out", str(tmp_path / "out"),
            "--resume"]
    other = write_jsonl((tmp_path / "other").mkdir() or tmp_path / "other" / "p.jsonl",
                        [RECORDS[0], {**RECORDS[1], "prompt": "a green circle at the top left"}, RECORDS[2]])
    assert generate_batch.main(same + ["--prompts", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"error: --prompts {other} line 2: {run_dir / '00007' / 'metadata.json'} holds another record than this line "
        "(idx 7), the one the samples in its folder belong to; run the prompt file the run was drawn from, or pass "
        "another --run-name / --out\n")
    assert generate_batch.main(same + ["--prompts", str(prompts), "--seed", "1"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: the 6 samples in {run_dir} were drawn with --seed 0; this run has --seed 1; resume with "
        "the settings they were drawn with, or pass another --run-name / --out\n")
    assert generate_batch.main(same + ["--prompts", str(prompts), "--cfg", "2", "--steps", "3", "--ar-size",
                                       "32x32"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: the 6 samples in {run_dir} were drawn with --cfg 1.5, --ar-size 64x64, --steps 10; this run "
        "has --cfg 2.0, --ar-size 32x32, --steps 3; resume with the settings they were drawn with, or pass another "
        "--run-name / --out\n")
    assert files(run_dir) == want


def test_prompt_file_work_is_lazy(tmp_path, monkeypatch):
    """2000 prompts x 1000 samples: no list of every sample is built and no metadata.json is written up front (a
    100k-line file used to spend minutes writing and syncing metadata before its first image); a record's
    metadata.json is written as its first sample starts."""
    import load_hf
    import pipeline as P

    class Stop(Exception):
        pass

    seen = {}

    def first_batch(net, tok, prompts, **k):
        seen.update(prompts=prompts, seeds=k["seed"])
        raise Stop

    monkeypatch.setattr(load_hf, "load_ar", lambda *a, **k: (None, None))
    monkeypatch.setattr(load_hf, "load_decoder", lambda *a, **k: None)
    monkeypatch.setattr(P, "generate_bits", first_batch)
    f = tmp_path / "many.txt"
    f.write_text("".join(f"a {c} circle at the top left\n" for c in ["red", "blue"] * 1000))
    with pytest.raises(Stop):
        generate_batch.main(["--ckpt", str(TOY), "--prompts", str(f), "--samples-per-prompt", "1000",
                             "--batch-size", "4", "--out", str(tmp_path / "o")])
    assert seen == {"prompts": ["a red circle at the top left"] * 4,
                    "seeds": [P.sample_seed(0, 0, k) for k in range(4)]}
    assert sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*")) == [
        "many", f"many/{generate_batch.RUN_SETTINGS}", "many/00000", "many/00000/metadata.json"]


def test_ctrl_c_keeps_the_finished_samples_and_resume_completes(reference, tmp_path):
    """Ctrl-C while a prompt file runs: one line saying where the finished samples are and how to continue, exit
    code 130, no traceback; the records not started yet have no metadata.json; --resume then writes exactly the
    missing samples, the same bytes as an uninterrupted run."""
    import signal

    d, prompts, want, _ = reference
    out = tmp_path / "out"
    args = ["--ckpt", TOY, "--prompts", prompts, "--samples-per-prompt", 12, "--batch-size", 1, "--out", out]
    p = subprocess.Popen([sys.executable, str(ROOT / "generate_batch.py")] + [str(a) for a in args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = p.stdout.readline()  # the first sample is written
    assert first.strip() == str(out / "p" / "00000" / "samples" / "0000.png"), p.stderr.read()[-2000:]
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    *bar, last = [line for line in err.replace("\r", "\n").split("\n") if line]
    assert last == (f"interrupted by SIGINT: the finished samples are kept in {out / 'p'}; continue with the same "
                    "flags and --resume")
    assert all(line.startswith("samples:") for line in bar), err  # only the progress bar before it
    assert not (out / "p" / "00002").exists()  # the third record had not started
    written = {first.strip()} | set(rest.split())
    r = run(args + ["--resume"])
    assert not written & set(r.stdout.split())  # nothing finished is written again
    got = files(out / "p")
    assert len([n for n in got if n.endswith(".png")]) == 36
    assert {n: got[n] for n in want} == want


def test_score_reads_a_run_back(reference, capsys):
    """`train.py --score RUN_DIR` prints one JSON line: the fraction of samples the toy evaluator reads as their
    prompt, overall and per the records' tag."""
    d = reference[0] / "out" / "p"
    assert train.main(["--score", str(d)]) == 0
    got = json.loads(capsys.readouterr().out)
    ok = {rec["idx"]: [toy.score_image(np.asarray(Image.open(d / f"{rec['idx']:05d}" / "samples" / f"{k:04d}.png")
                                                  .convert("RGB")), rec["prompt"])["correct"] for k in range(2)]
          for rec in RECORDS}
    assert got["samples"] == 6
    assert got["overall"] == pytest.approx(np.mean(sum(ok.values(), [])))
    assert got["per_category"]["single_object"] == pytest.approx(np.mean(ok[0] + ok[2]))
    assert got["per_category"]["two_object"] == pytest.approx(np.mean(ok[7]))


def test_shipped_prompt_file_is_the_evaluation_s():
    """prompts/toy_heldout.jsonl holds the evaluation's held-out generation prompts, in order, tagged."""
    recs = [json.loads(l) for l in (ROOT / "prompts" / "toy_heldout.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == toy.heldout_prompts(256) and [r["idx"] for r in recs] == list(range(256))
    assert {r["meta"]["tag"] for r in recs} == {"single_object", "two_object"}


def test_score_of_a_prompt_file_run_equals_the_evaluation(tmp_path, capsys):
    """The first 16 records of prompts/toy_heldout.jsonl through `generate_batch.py --prompts` (batch 5), scored with
    `train.py --score`, give exactly the generation figures of the evaluation on the same 16 prompts (batch 32): the
    same images, since each depends only on (seed, prompt index)."""
    head = tmp_path / "toy_heldout.jsonl"
    head.write_text("".join((ROOT / "prompts" / "toy_heldout.jsonl").read_text().splitlines(True)[:16]))
    run(["--ckpt", TOY, "--prompts", head, "--batch-size", 5, "--out", tmp_path / "out"])
    assert train.main(["--score", str(tmp_path / "out" / "toy_heldout")]) == 0
    got = json.loads(capsys.readouterr().out)
    import load_hf

    net, tok = load_hf.load_ar(TOY)
    dec = load_hf.load_decoder(TOY)
    settings = {**train.sample_defaults(train.TrainConfig()), **cli.read_sample_settings(TOY, required=True, defaults={})}
    want = evaluate.evaluate(net, tok, dec, settings=settings, n=16)
    assert got["samples"] == 16 and got["overall"] == want["generation"]
    assert {k: v for k, v in got.items() if k.startswith("generation_")} == \
        {k: v for k, v in want.items() if k.startswith("generation_")}
