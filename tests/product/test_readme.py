"""The README and its docs/ pages say what is true: the Python API examples run as written (the full one in
docs/api.md on the golden tiny checkpoint, only its first line swapped, and on the toy checkpoint; the README's
conversation block on the toy checkpoint) and produce what they say; every command in a bash block is run or said why
not; the paper -> code table names functions and tests that exist; every relative link leads to a file."""
import ast
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import decoder
import toy

README = Path(__file__).resolve().parents[2] / "README.md"
DOCS = README.parent / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]  # the README and the pages it points to


def _api_block() -> str:
    """docs/api.md's full Python API example (its first python block)."""
    return re.search(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)


def _block_texts(code: str) -> tuple:
    """The block's PROMPT, EDIT, QUESTION (its second line)."""
    line = next(l for l in code.splitlines() if l.startswith("PROMPT, EDIT, QUESTION = "))
    return ast.literal_eval(line.split(" = ", 1)[1])


def test_readme_python_api_example_runs(golden, golden_ckpt, tmp_path, monkeypatch, capsys):
    """The README's Python API block, run as written on the golden checkpoint, produces what it says: the template
    rendering the fixture's official prompts use, its tokens, the seeded bits of text-to-image and editing (those
    pipeline.generate_bits gives for the block's arguments; the same call reproduces the official e2e indices), the greedy
    answer pipeline.answer gives, and the decoder's images of those bits, the first saved as cube.png."""
    import bsq
    import load_hf
    import pipeline as P
    from test_sample import valid_upsample

    code = _api_block()
    first, rest = code.split("\n", 1)
    assert first.startswith("CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = ")
    prompt, edit, question = _block_texts(rest)
    s = golden.scenario("e2e")
    H, W = s["ar_height"], s["ar_width"]
    up, out_h, out_w = valid_upsample(golden, H, W)  # a ratio the fixture's decoder accepts at the e2e AR size
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8)).save(tmp_path / "photo.png")
    # the golden folder has no text encoders: seed the decoder prompt cache as a first run with them would
    joint = json.loads((golden.dir / "sd3_transformer" / "config.json").read_text())["joint_attention_dim"]
    monkeypatch.setenv("UNIAR_CACHE", str(tmp_path / "cache"))
    load_hf.write_prompt_cache(
        load_hf.prompt_cache_path(golden_ckpt / "sd3_pipeline", tmp_path / "cache", decoder.DECODER_PROMPT,
                                        joint),
        golden["dec.pipe_prompt_embeds"], golden["dec.pipe_pooled"])
    monkeypatch.chdir(tmp_path)
    # the golden checkpoint with the released preprocessor_config.json (understanding resizes the photo by it)
    header = f"CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = {str(golden_ckpt)!r}, 'photo.png', {H}, {W}, {up!r}\n"
    script = tmp_path / "readme_example.py"
    script.write_text(header + rest)
    capsys.readouterr()
    # what the block hands to the AR loops: the prompts of its drawings (with the photo or not) and its answer
    drawn, answered, real_image, real_text = [], [], P.generate_image, P.generate_text

    def spy_image(model, ids, mask, *a, pixel_values=None, **kw):
        drawn.append((ids.cpu(), mask.cpu(), None if pixel_values is None else pixel_values.cpu()))
        return real_image(model, ids, mask, *a, pixel_values=pixel_values, **kw)

    def spy_text(model, ids, mask=None, *a, **kw):
        out = real_text(model, ids, mask, *a, **kw)
        answered.append((ids.cpu(), None if mask is None else mask.cpu(), kw, out))
        return out

    monkeypatch.setattr(P, "generate_image", spy_image)
    monkeypatch.setattr(P, "generate_text", spy_text)
    scope = runpy.run_path(str(script))
    monkeypatch.setattr(P, "generate_image", real_image)
    monkeypatch.setattr(P, "generate_text", real_text)
    printed = capsys.readouterr().out
    # prompt rendering and tokens: the official rendering of the fixture's prompt, with the block's prompt in it
    assert scope["text"] == s["rendered"][0].replace(s["prompt"], prompt, 1)
    if s["prompt"] == prompt:  # the official tokenization (row 0, left padding removed)
        row = golden["e2e.prefix_ids"][0][golden["e2e.attention_mask"][0].bool()]
        assert scope["ids"].tolist() == [row.tolist()] and scope["mask"].bool().all()
    # bits: the generate_bits call the block makes, a call that reproduces the official seeded e2e indices
    net, tok = load_hf.load_ar(golden_ckpt)
    official = P.generate_bits(net, tok, s["prompt"], ar_height=H, ar_width=W, cfg_scale=s["cfg"],
                               temperature=s["temperature"], seed=golden.seed("e2e.indices", "e2e"))
    assert torch.equal(bsq.bits_to_indexes(official), golden["e2e.indices"])
    N = (H // net.cfg.downsample) * (W // net.cfg.downsample)
    assert scope["bits"].shape == (1, N, *net.bits_shape)
    assert torch.equal(scope["bits"], P.generate_bits(net, tok, prompt, ar_height=H, ar_width=W, cfg_scale=1.5,
                                                      temperature=1.0, seed=0))
    photo = Image.open(tmp_path / "photo.png")
    assert torch.equal(scope["edited"], P.generate_bits(net, tok, edit, ar_height=H, ar_width=W, cfg_scale=1.5, seed=0,
                                                        input_images=[photo]))
    # the edit is conditioned on the photo (whether its bits differ from the drawing's is the weights' business): the
    # drawing's prompt has no image, the edit's carries the photo's patch rows and its image tokens in both rows
    image_id = golden.config["image_token_id"]
    assert len(drawn) == 2 and drawn[0][2] is None and not (drawn[0][0] == image_id).any()
    ids_e, mask_e, pv_e = drawn[1]
    v = golden.config["vision_config"]  # the photo is resized to the AR size: one token per merged patch block
    n_edit = (H // v["patch_size"]) * (W // v["patch_size"]) // v["spatial_merge_size"] ** 2
    assert pv_e is not None and pv_e.shape[0] > 0
    assert ((ids_e == image_id) & mask_e.bool()).sum(1).tolist() == [n_edit] * ids_e.shape[0]
    # understanding: the printed line is pipeline.answer's greedy answer, of the chat prompt with the photo (checked
    # by its ids, so an answer that ends at once, an empty line, still pins what was asked)
    want = P.answer(net, tok, photo, question, max_new_tokens=32)
    assert printed == want + "\n"
    _, _, (n_img,) = P.understanding_inputs(net, [photo])
    q_ids, q_mask = tok.batch([P.render_chat_prompt(question, n_img)])
    assert len(answered) == 1
    a_ids, a_mask, a_kw, a_out = answered[0]
    assert torch.equal(a_ids, q_ids) and (a_mask is None or torch.equal(a_mask.to(q_mask.dtype), q_mask))
    assert a_kw["max_new_tokens"] == 32 and len(a_out[0]) <= 32 and printed == tok.decode(a_out[0]) + "\n"
    # pixels: the decoder's images of both bit sets, saved as generated.png and edited.png
    images = scope["images"]
    assert images.shape == (2, out_h, out_w, 3) and images.dtype == torch.uint8
    again = scope["dec"].decode(torch.cat([scope["bits"], scope["edited"]]), H, W, upsampling_ratio=up, steps=28,
                                guidance=1.5, seed=0)
    assert torch.equal(images, again)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "generated.png")), images[0].numpy())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "edited.png")), images[1].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Every command of the README, run as written on the shipped checkpoints (the toy's own checkpoint, picture and sizes
# where the README names a released one), with its outcome checked
# ---------------------------------------------------------------------------------------------------------------------

ROOT = README.parent
PICTURE = "a red square at the top left"  # the toy picture given as in.png / the photo
NOT_RUN = {  # README commands the suite does not run, and why
    "pip install": "installs packages (CI's .ci/run installs the requirements the same way)",
    "huggingface-cli download": "downloads the 37 GB released checkpoint (no hub access here)",
    "TRITON_INTERPRET=1 python -m pytest": "the suite itself",
    "UNIAR_GOLDEN_DIR=": "the suite on another fixture set",
    "python train.py\n": "10 minutes at its defaults: tests/training/test_train.py runs the same code at the smoke size, and "
                         "test_a_run_never_replaces_what_it_did_not_write its default output folder",
    "python rl.py\n": "15 minutes at its defaults: tests/training/test_rl.py runs the same code at a tiny size",
    "torchrun --nproc_per_node 8": "8 GPUs and the released checkpoint: tests/product/test_prompts.py runs torchrun with 2 "
                                   "CPU processes on the toy checkpoint",
    "python generate_batch.py --prompts prompts/toy_heldout.jsonl": "256 images: tests/product/test_prompts.py runs its first "
                                                                     "16 records and checks --score against the evaluation",
    "python train.py --score": "tests/product/test_prompts.py (test_score_of_a_prompt_file_run_equals_the_evaluation)",
    "python train.py --init": "a fine-tune (the demonstration's: 40 s): tests/training/test_finetune.py runs the same code "
                              "on the golden checkpoint (full, LoRA + merge, resume, torchrun) and checks the outputs",
    "python train.py --toy-data": "1600 records: tests/training/test_finetune.py writes the same data at a small size",
    "python train.py --eval demo/": "the demonstration's fine-tuned checkpoints: tests/training/test_finetune.py runs "
                                    "--eval --data on the toy checkpoint (test_toy_demonstration_data_...)",
    "python train.py --plan-memory": "tests/training/test_finetune.py (test_memory_plan_of_the_released_model)",
    "python bench.py finetune-memory": "a 45 s benchmark of four fresh processes; its plan is tested in "
                                       "tests/training/test_finetune.py",
}
RUN = {  # the rest: the test below that runs the command and checks its outcome
    "python chat.py --file": "test_chat_file_draws_asks_and_edits_in_one_context",
    "python chat.py\n": "test_chat_file_draws_asks_and_edits_in_one_context (the same loop, lines from stdin)",
    "python sample.py\n": "test_sample_with_no_argument",
    "python sample.py --": "test_command_line_examples_on_the_toy_checkpoint",
    "python train.py --eval checkpoints/toy": "tests/training/test_shipped.py (the scores printed are the README's)",
    "python -c": "test_part_sizes_command_prints_the_table",
}


def bash_commands() -> list:
    """Every command line in the bash blocks of the README and docs/, without its trailing comment (and with its '&&'
    parts)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(p.read_text() for p in PAGES), re.S):
        for line in block.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            out += [part.strip() + "\n" for part in line.split("&&") if part.strip()]
    return out


def test_every_readme_command_is_run_or_said_why_not():
    for cmd in bash_commands():
        assert any(cmd.startswith(k) for k in (*NOT_RUN, *RUN)), f"README command with no test: {cmd}"


def run_here(cwd: Path, cmd: str) -> subprocess.CompletedProcess:
    """A README command (`python X.py ...`) run with this checkout's X.py, in cwd; one thread, as the figures were
    measured."""
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    argv = [sys.executable, str(ROOT / argv[1])] + argv[2:]
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "UNIAR_CACHE": str(cwd / "cache")})
    assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture
def workdir(tmp_path):
    """A user's folder: the shipped checkpoints reachable as checkpoints/ (as from the repository root) and the toy
    picture as in.png."""
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    Image.fromarray(toy.render(toy.parse_caption(PICTURE))).save(tmp_path / "in.png")
    return tmp_path


def drawn(workdir: Path) -> np.ndarray:
    return np.asarray(Image.open(workdir / "out" / "sample_00.png").convert("RGB"))


def expected_answer(question: str) -> str:
    shape = re.fullmatch(r"what color is the (\w+)\?", question).group(1)
    return next(o.color for o in toy.parse_caption(PICTURE) if o.shape == shape)


def test_command_line_examples_on_the_toy_checkpoint(workdir):
    """The README's sample.py commands with `--ckpt UniAR-RL` replaced by the shipped toy checkpoint (and the GRPO
    checkpoint's command as written): the text-to-image prompts are drawn as the toy evaluator reads them, the edit
    shows the edited scene, and the printed answer is the right one."""
    cmds = [c for c in bash_commands() if c.startswith("python sample.py --") and "--prompts" not in c
            and "--chat" not in c]
    kinds = set()
    for cmd in cmds:
        argv = shlex.split(cmd.replace("--ckpt UniAR-RL", "--ckpt checkpoints/toy"))
        flags = dict(zip(argv[2::2], argv[3::2]))
        shutil.rmtree(workdir / "out", ignore_errors=True)
        r = run_here(workdir, shlex.join(argv))
        if "--question" in flags:
            kinds.add("understanding")
            assert r.stdout == expected_answer(flags["--question"]) + "\n", cmd
        elif "--image" in flags:
            kinds.add("editing")
            target = toy.apply_edit(toy.parse_caption(PICTURE), flags["--prompt"])
            assert toy.score_edit(drawn(workdir), target)["correct"], cmd
        else:
            kinds.add("text-to-image")
            assert toy.score_image(drawn(workdir), flags["--prompt"])["correct"], cmd
    assert kinds == {"text-to-image", "editing", "understanding"}


def test_sample_with_no_argument(workdir):
    """`python sample.py` as written: the shipped toy checkpoint draws its example prompt into out/sample_00.png."""
    run_here(workdir, "python sample.py")
    prompt = json.loads((ROOT / "checkpoints" / "toy" / "uniar_sample.json").read_text())["prompt"]
    assert toy.score_image(drawn(workdir), prompt)["correct"]


def test_readme_python_api_example_on_the_toy_checkpoint(workdir, monkeypatch, capsys):
    """The Python API block with its first line set to the shipped toy checkpoint, the toy picture and the toy's
    sizes: the generated image shows the prompt, the edited one the edited picture, and the printed answer is
    right."""
    first, rest = _api_block().split("\n", 1)
    prompt, edit, question = _block_texts(rest)
    monkeypatch.chdir(workdir)
    script = workdir / "readme_example.py"
    script.write_text("CKPT, PHOTO, AR_H, AR_W, UPSAMPLE = 'checkpoints/toy', 'in.png', 64, 64, 1.0\n" + rest)
    capsys.readouterr()
    runpy.run_path(str(script))
    assert capsys.readouterr().out == expected_answer(question) + "\n"
    gen, edited = (np.asarray(Image.open(workdir / f).convert("RGB")) for f in ("generated.png", "edited.png"))
    assert toy.score_image(gen, prompt)["correct"]
    assert toy.score_edit(edited, toy.apply_edit(toy.parse_caption(PICTURE), edit))["correct"]


def test_part_sizes_command_prints_the_table():
    """The size command (docs/checkpoints.md), run as written from the repository root: each part's figure is in the
    table's size column (to its rounding)."""
    cmd = next(c for c in bash_commands() if c.startswith("python -c"))
    r = subprocess.run([sys.executable] + shlex.split(cmd)[1:], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = (DOCS / "checkpoints.md").read_text()
    table = text.split("| part | folder | parameters | size |", 1)[1].split("\n\n", 1)[0]
    column = [float(x) for row in table.splitlines()[2:] for x in re.findall(r"\d+\.?\d*", row.split("|")[-2])]
    column += [float(x) for x in re.findall(r"([\d.]+) GB", table)]  # a variant named in its part's cell
    printed = [float(line.split()[-2]) for line in r.stdout.splitlines()]
    assert len(printed) == len(list((ROOT / "tests" / "fixtures" / "manifests").glob("*.json"))) >= 5
    for gb in printed:
        assert any(abs(gb - c) <= 0.05 + 1e-9 for c in column), (gb, column)


def _paper_table() -> list:
    """The README's "Reading the paper with the code" table: (idea, where, proved by) per row."""
    text = README.read_text()
    table = text[text.index("| idea of the paper | where | proved by |"):text.index("## Files")]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| idea")]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    assert all(len(c) == 3 for c in cells), rows
    return cells


def test_every_name_of_the_reading_tour_exists():
    """The README's "Reading the paper with the code" table: one function (or a few) per idea, and every name it
    gives exists in the file it names."""
    import importlib

    rows = _paper_table()
    assert len(rows) >= 15
    for idea, where, _ in rows:
        for part in where.split(";"):
            m = re.match(r"\s*`([\w/]+)\.py`: (.*)", part)
            assert m, idea
            module = importlib.import_module(m.group(1).replace("/__init__", "").replace("/", "."))
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                obj = module
                for attr in name.split("."):
                    obj = getattr(obj, attr, None)
                    assert obj is not None, f"{m.group(1)}.py has no {name} ({idea})"


def missing_tests(cell: str) -> list:
    """The `tests/<group>/<file>.py::<test>` names of a "proved by" cell that are not a test function defined in that file
    (a name in no such form is missing too)."""
    names = re.findall(r"`([^`]+)`", cell)
    missing = [] if names else [cell]
    for name in names:
        m = re.fullmatch(r"(tests/(?:\w+/)?test_\w+\.py)::(test_\w+)", name)
        path = ROOT / m.group(1) if m else None
        if path is None or not path.is_file():
            missing.append(name)
            continue
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        if m.group(2) not in defined:
            missing.append(name)
    return missing


def test_every_proved_by_test_of_the_paper_table_exists():
    """Each idea of the paper table names at least one test, as tests/<group>/<file>.py::<test>, and each is a test function
    defined in that file."""
    assert missing_tests("`tests/product/test_readme.py::test_every_proved_by_test_of_the_paper_table_exists`") == []
    assert missing_tests("`tests/product/test_readme.py::test_no_such_test`, `tests/test_none.py::test_x`") == [
        "tests/product/test_readme.py::test_no_such_test", "tests/test_none.py::test_x"]
    rows = _paper_table()
    assert len(rows) >= 15
    for idea, _, proved_by in rows:
        assert missing_tests(proved_by) == [], idea


def _anchors(page: Path) -> set:
    """The anchors GitHub gives the headings of a markdown page."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def broken_links(page: Path) -> list:
    """The relative links of a markdown page ([text](target), ![alt](target), <img src="target">) whose file does
    not exist, or whose #anchor is no heading of the page it points at. Web addresses are not checked."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img[^>]*\ssrc="([^"]+)"', text)
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    return broken


def test_every_relative_link_of_the_readme_and_docs_leads_somewhere(tmp_path):
    """Every relative link of README.md and docs/*.md points at a file that exists (and at a heading of it, for an
    #anchor); the README links to every docs/ page."""
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](#a-title) [gone](missing.md) [bad](#no-heading) ![x](page.md) "
                    '<img src="none.png"> [web](https://example.com)\n')
    assert broken_links(page) == ["missing.md", "#no-heading", "none.png"]
    assert len(PAGES) >= 5
    for p in PAGES:
        assert broken_links(p) == [], p.name
    linked = set(re.findall(r"\]\((docs/[\w.]+\.md)", README.read_text()))
    assert linked == {f"docs/{p.name}" for p in PAGES[1:]}


def test_readme_scores_are_the_tables_of_training_md():
    """The shipped checkpoints' scores the README's Toy world section states are the rows of docs/training.md's tables
    (which tests/training/test_shipped.py checks against what `python train.py --eval` prints)."""
    section = README.read_text().split("## Toy world", 1)[1].split("\n#", 1)[0]
    toy_says = re.search(r"`checkpoints/toy` ([\d.]+)% generation, ([\d.]+)% understanding, ([\d.]+)% editing", section)
    rl_says = re.search(r"`checkpoints/toy-rl` ([\d.]+)% / ([\d.]+)% / ([\d.]+)%", section)
    rows = (DOCS / "training.md").read_text().splitlines()

    def row(label):
        return re.findall(r"([\d.]+)%", next(r for r in rows if r.startswith(f"| {label}")))

    assert list(toy_says.groups()) == row("`checkpoints/toy` |")[:3]
    assert list(rl_says.groups()) == row("after 100 steps")[:3]


def _chat_blocks() -> tuple:
    """The Conversations section's scripted session: (turns.txt lines, the transcript it printed, the images shown)."""
    section = README.read_text().split("## Conversations: one shared context", 1)[1].split("\n## ", 1)[0]
    turns, transcript = re.findall(r"```text\n(.*?)```", section, re.S)[:2]
    return turns, transcript.splitlines(), re.findall(r'<img src="([^"]+)"', section)


def test_chat_file_draws_asks_and_edits_in_one_context(workdir):
    """The README's scripted session (draw, ask, edit) run with its `chat.py --file` command on the toy checkpoint: it
    prints the README's transcript; the drawing shows the prompt (toy evaluator); the answer is the truth about the
    drawn image, read from the context; the edit shows the drawing's scene with the instruction applied; the README's
    images show the scenes of the files written. Typed on stdin (`chat.py`), the same turns give the same answer and
    images."""
    cmd = next(c for c in bash_commands() if c.startswith("python chat.py --file"))
    turns, transcript, shown = _chat_blocks()
    (workdir / "turns.txt").write_text(turns)
    r = run_here(workdir, cmd)
    assert r.stdout.splitlines() == transcript
    draw, question, edit = [line for line in turns.splitlines() if line.strip()]
    files = [workdir / line.split(": ", 1)[1] for line in transcript if line.startswith("model: ") and ".png" in line]
    first, second = (np.asarray(Image.open(f).convert("RGB")) for f in files)
    assert toy.score_image(first, draw.removeprefix("/draw "))["correct"]
    scene = toy.read_scene(first)
    shape = re.fullmatch(r"what color is the (\w+)\?", question).group(1)
    assert transcript[3] == "model: " + next(o.color for o in scene if o.shape == shape)
    assert toy.score_edit(second, toy.apply_edit(scene, edit.removeprefix("/draw ")))["correct"]
    assert [toy.read_scene(np.asarray(Image.open(ROOT / f).convert("RGB"))) for f in shown] == [scene,
                                                                                  toy.read_scene(second)]
    argv = [sys.executable, str(ROOT / "chat.py"), "--out", str(workdir / "typed")]
    typed = subprocess.run(argv, cwd=workdir, input=turns, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert typed.returncode == 0, typed.stderr[-2000:]
    assert [l for l in typed.stdout.splitlines() if not l.endswith(".png")] == [l for l in transcript[1::2]
                                                                               if not l.endswith(".png")]
    assert [(workdir / "typed" / f.name).read_bytes() for f in files] == [f.read_bytes() for f in files]


def test_conversation_example_reads_its_own_drawing(tmp_path, monkeypatch, capsys):
    """The README's Python API block (a conversation), run as written from the repository root on the shipped toy
    checkpoint: it draws the prompt (toy evaluator on the decoded bits), prints the answer that is true of its own
    drawing, read from the context, and its edit turn draws an image of the same size."""
    import load_hf

    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'load_hf.load_ar("checkpoints/toy")' in code
    dec = load_hf.load_decoder(ROOT / "checkpoints" / "toy")
    script = tmp_path / "conversation_example.py"
    script.write_text(code)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    scope = runpy.run_path(str(script))
    image = dec.decode(scope["bits"], 64, 64, upsampling_ratio=1.0, steps=10, guidance=1.5, seed=0)[0].numpy()
    prompt = re.search(r'chat.draw\("([^"]+)"', code).group(1)
    assert toy.score_image(image, prompt)["correct"]
    shape = re.search(r'chat.ask\("what color is the (\w+)\?"\)', code).group(1)
    truth = next(o.color for o in toy.read_scene(image) if o.shape == shape)
    assert capsys.readouterr().out == truth + "\n"
    assert scope["edited"].shape == scope["bits"].shape
    assert len(scope["chat"].ctx.images) == 2  # both drawings stay in the context, as bits
