"""Parity of model.py (the unified AR model) with the official outputs in the golden fixtures.

Sizes, seeds and settings come from the fixture folder (config.json, golden.json), never from constants.
"""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import bsq
import load_hf
import model as M
import pipeline as P
from conftest import assert_close_rel, assert_unchanged, fingerprint, load_manifest, own_copy, read_json
from bench import Recorder, generate_image_recompute

TOL = 1e-4  # absolute, float32


def sampler(cfg_scale=1.0, temperature=1.0, generator=None, record=True):
    s = M.MultinomialSampler(cfg_scale, temperature, generator)
    return Recorder(s) if record else s


@pytest.fixture(scope="module")
def cfg(golden):
    return M.UniARConfig.from_dict(golden.config)


@pytest.fixture(scope="module")
def ar(golden, cfg):
    """Shared by this file's tests, which never change it (checked at teardown); one that must patches a copy."""
    m = M.UniAR(cfg)
    m.load_state_dict(load_file(str(golden.dir / "model.safetensors")), strict=True)
    before = fingerprint(m.eval())
    yield m
    assert_unchanged(m, before, "ar")


@pytest.fixture(scope="module")
def tok(golden):
    return P.Tokenizer(golden.dir)


def seed_of(golden, name: str, scenario: str | None = None) -> int:
    """The seed set right before the call: from the scenario settings, else from the tensor's description."""
    return golden.seed(name, scenario)


def out_grid(pos_ids_all: torch.Tensor, n: int) -> tuple[int, int]:
    """The generated image's token grid (h, w), read from the h/w axes of its position ids (last n entries)."""
    p = pos_ids_all[:, 0, -n:]
    return int(p[1].max() - p[1].min()) + 1, int(p[2].max() - p[2].min()) + 1


def abs_err(a, e):
    """max |a - e| in units of max(1, max |e| / 16): the absolute error for values up to 16 in magnitude (the shipped
    fixtures' logits stay below 6, so there the bounds are absolute), the same relative bound beyond (a fixture set
    with larger logits has float32 rounding errors as much larger)."""
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return (a.double() - e.double()).abs().max().item() / max(1.0, e.double().abs().max().item() / 16)


# ----- structure -----

def meta_model(variant: str) -> M.UniAR:
    with torch.device("meta"):
        return M.UniAR(M.UniARConfig().with_head_variant(variant))


def test_full_size_keys_and_shapes_match_manifest():
    manifest = load_manifest("ar_model")
    variant = load_hf.head_variant_from_keys(manifest)
    sd = meta_model(variant).state_dict()
    got = {k: list(v.shape) for k, v in sd.items()}
    assert sorted(set(got) ^ set(manifest)) == []
    bad = {k: (got[k], manifest[k]) for k in manifest if got[k] != manifest[k]}
    assert bad == {}


def test_other_head_variants_key_sets():
    manifest = load_manifest("ar_model")
    base = {k for k in manifest if not k.startswith("output_layer_vistok.")}
    D = M.TextConfig().hidden_size
    O = M.UniARConfig().head_out
    mid = M.UniARConfig().vistok_mlp_dim
    expected = {
        "linear": {"output_layer_vistok.weight": [O, D]},
        "rmsnorm_linear": {"output_layer_vistok.0.weight": [D], "output_layer_vistok.1.weight": [O, D]},
        "rmsnorm_mlp": {"output_layer_vistok.0.weight": [D], "output_layer_vistok.1.weight": [mid, D],
                        "output_layer_vistok.3.weight": [O, mid]},
    }
    for variant, head in expected.items():
        sd = meta_model(variant).state_dict()
        assert set(sd) == base | set(head), variant
        assert {k: list(sd[k].shape) for k in head} == head, variant
        assert load_hf.head_variant_from_keys(sd) == variant


def test_config_from_dict(golden, cfg):
    c = golden.config
    assert cfg.text.hidden_size == c["text_config"]["hidden_size"]
    assert cfg.text.mrope_section == tuple(c["text_config"]["rope_scaling"]["mrope_section"])
    assert cfg.vision.deepstack_visual_indexes == tuple(c["vision_config"]["deepstack_visual_indexes"])
    assert cfg.image_token_id == c["image_token_id"]
    assert cfg.visual_transformer_decoder_depth == c["visual_transformer_decoder_depth"]
    d = dict(c, vistok_pred_use_mlp=True, vistok_pred_layernorm=False, some_unknown_key=1)
    assert M.UniARConfig.from_dict(d).head_variant == "rmsnorm_mlp"
    d = dict(c, vistok_pred_use_mlp=False, vistok_pred_layernorm=False)
    assert M.UniARConfig.from_dict(d).head_variant == "linear"
    assert load_hf.head_variant_from_keys(load_file(str(golden.dir / "model.safetensors"))) == cfg.head_variant
    M.UniAR(M.UniARConfig.tiny())  # the preset builds


# ----- understanding -----

def test_understanding_logits(golden, ar):
    logits = ar.text_logits(golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"])
    assert abs_err(logits, golden["und.logits"]) <= TOL


def und_args(golden):
    return golden["und.input_ids"], None, golden["vision.patches"], golden["vision.grid_thw"]


def und_batch_args(golden):
    return golden["und.batch_input_ids"], golden["und.batch_attention_mask"], golden["vision.patches"], \
        golden["vision.grid_thw"]


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids, mask) left padded with `pad` (the fixtures' batch layout)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


def reference_decode(ar, ids, mask, pv, grid, n, temperature=0.0, generator=None):
    """Decoding by a full forward (model.text_logits) over prompt + tokens so far at every step: (tokens (B, n),
    per-step last-position logits (n, B, V)). Samples with one torch.multinomial per step."""
    mask = torch.ones_like(ids) if mask is None else mask
    toks, steps = [], []
    for _ in range(n):
        logits = ar.text_logits(ids, mask, pv, grid)[:, -1].float()
        steps.append(logits)
        t = logits.argmax(-1) if temperature == 0 else \
            torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
        toks.append(t)
        ids, mask = torch.cat([ids, t[:, None]], 1), torch.cat([mask, torch.ones_like(t)[:, None]], 1)
    return torch.stack(toks, 1), torch.stack(steps)


def test_greedy_text_exact(golden, ar):
    """The official greedy continuation of the image prompt (end-of-text disabled);
    with a stop id the row ends at its first occurrence, the stop token kept."""
    want = golden["und.greedy_ids"]
    got = M.generate_text(ar, *und_args(golden), max_new_tokens=want.shape[1])
    assert torch.equal(torch.tensor(got), want)
    stop = int(want[0, want.shape[1] // 2])
    first = want[0].tolist().index(stop)
    got = M.generate_text(ar, *und_args(golden), max_new_tokens=want.shape[1], stop_ids=[stop])
    assert got == [want[0, :first + 1].tolist()]


def test_batch_greedy_exact(golden, ar):
    """A batch left padded (with 0 in the shipped sets; row 0 the image prompt with the image, row 1 text only)
    decodes greedily to the official ids."""
    ids, mask, pv, grid = und_batch_args(golden)
    rows = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
    assert torch.equal(rows[0], golden["und.input_ids"][0])
    padded = ids[mask == 0].unique()  # the padding id the fixture used (0 in the shipped sets), one for all rows
    assert padded.numel() <= 1, padded
    built = left_pad(rows, int(padded[0]) if padded.numel() else 0)
    assert torch.equal(built[0], ids) and torch.equal(built[1], mask)
    want = golden["und.batch_greedy_ids"]
    n = want.shape[1]
    got = M.generate_text(ar, ids, mask, pv, grid, max_new_tokens=n)
    assert torch.equal(torch.tensor(got), want)


def test_text_step_logits_equal_full_forward(golden, ar):
    """At every step of a cached greedy decode of the padded batch, the logits equal a full forward over prompt +
    tokens so far (and step 0 equals the official logits of the prompt's last position)."""
    ids, mask, pv, grid = und_batch_args(golden)
    n = golden["und.batch_greedy_ids"].shape[1]
    seen = []
    hook = ar.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out[:, -1] if out.dim() == 3 else out))
    try:
        got = M.generate_text(ar, ids, mask, pv, grid, max_new_tokens=n)
    finally:
        hook.remove()
    ref_toks, ref_logits = reference_decode(ar, ids, mask, pv, grid, n)
    assert torch.equal(torch.tensor(got), ref_toks)
    assert len(seen) == n
    for i in range(n):
        assert_close_rel(seen[i].float(), ref_logits[i], 1e-5, f"step {i}")
    assert abs_err(seen[0][0], golden["und.logits"][0, -1]) <= TOL


def test_sampled_text_matches_reference(golden, ar):
    """Sampling at temperature 0.7 with a seeded generator draws the same tokens as a reference sampler over full
    forwards (softmax(logits / T), one torch.multinomial per step)."""
    ids, mask, pv, grid = und_batch_args(golden)
    n = golden["und.batch_greedy_ids"].shape[1]
    got = M.generate_text(ar, ids, mask, pv, grid, max_new_tokens=n, temperature=0.7,
                          generator=torch.Generator().manual_seed(3))
    want, _ = reference_decode(ar, ids, mask, pv, grid, n, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(torch.tensor(got), want)


# ----- answer(): chat prompt and end tokens -----

def tokenizer_files(golden, dst, generation_eos=None):
    """A copy of the checkpoint's tokenizer files; generation_eos: token names to list as generation_config.json's
    eos_token_id (like Qwen3-VL's [<|im_end|>, <|endoftext|>])."""
    import shutil

    dst.mkdir()
    for f in golden.dir.iterdir():
        if f.is_file() and not f.name.startswith(("golden", "model", "config")) and f.suffix in (".json", ".txt"):
            shutil.copy(f, dst / f.name)
    if generation_eos is not None:
        gen = read_json(dst / "generation_config.json") if (dst / "generation_config.json").exists() else {}
        gen["eos_token_id"] = [added_tokens(dst)[t] for t in generation_eos]
        (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


def added_tokens(folder) -> dict[str, int]:
    return {t["content"]: t["id"] for t in read_json(folder / "tokenizer.json")["added_tokens"]}


def end_ids_from_files(folder) -> set[int]:
    """Where an answer ends, read from the files: tokenizer eos token, <|im_end|>, generation_config eos_token_id."""
    added = added_tokens(folder)
    eos = read_json(folder / "tokenizer_config.json").get("eos_token") or \
        read_json(folder / "special_tokens_map.json")["eos_token"]
    ends = {added[eos["content"] if isinstance(eos, dict) else eos], added["<|im_end|>"]}
    if (folder / "generation_config.json").exists():
        e = read_json(folder / "generation_config.json").get("eos_token_id")
        ends |= set() if e is None else {e} if isinstance(e, int) else set(e)
    return ends


class ForcedRows(torch.nn.Module):
    """Replaces lm_head: call i puts all mass on seqs[row][i] for each row (the last entry repeats)."""

    def __init__(self, seqs, vocab):
        super().__init__()
        self.seqs, self.vocab, self.calls = seqs, vocab, 0

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], self.vocab)
        for r, seq in enumerate(self.seqs):
            out[r, ..., seq[min(self.calls, len(seq) - 1)]] = 1.0
        self.calls += 1
        return out


@pytest.mark.parametrize("generation_eos", [None, ["<|im_end|>", "<|endoftext|>"]])
def test_answer_stops_only_at_end_tokens(golden, ar, tmp_path, generation_eos):
    """answer() ends at each end token of the checkpoint's files (including generation_config.json's eos ids) and
    decodes on through every other added token (special or not); the text is that of the tokens before the end."""
    folder = tokenizer_files(golden, tmp_path / "tok", generation_eos)
    tok = P.Tokenizer(folder)
    ends = end_ids_from_files(folder)
    specials = set(added_tokens(folder).values())
    others = sorted(specials - ends - ({tok.pad_id} if generation_eos is None else set()))
    a, b, c = tok.encode(" yes"), tok.encode(" no"), tok.encode(" later")
    cases = [(s, min(ends)) for s in others] + [(others[0], e) for e in sorted(ends)]
    net = own_copy(ar)
    for s, e in cases:
        seq = a + [s] + b + [e] + c
        net.lm_head = ForcedRows([seq], net.cfg.text.vocab_size)
        text = P.answer(net, tok, None, "what?", max_new_tokens=len(seq) + 3)
        # the text of every token before the end: a special token decodes to nothing, an added token that is not
        # special (Qwen3's <think>, <tool_call>, ...) to its own text
        want = tok.decode(a + [s] + b)
        assert text == want, (s, e, text)
        assert want not in (tok.decode(a), tok.decode(a + [s])), (s, want)  # it did decode on past s


def test_batch_rows_stop_independently(golden, ar, tok):
    """In a batch each row ends at its own first stop token and stays ended while other rows go on: tokens a
    finished row would produce later (even a second stop) are never appended to it."""
    ids, mask = golden["und.batch_input_ids"], golden["und.batch_attention_mask"]
    stop = tok.token_id("<|im_end|>")
    a, b = tok.encode(" yes no"), tok.encode(" later on and on")
    rows = [a[:1] + [stop] + b + [stop], a + b + [stop]]
    net = own_copy(ar)
    net.lm_head = ForcedRows(rows, net.cfg.text.vocab_size)
    new = M.generate_text(net, ids, mask, golden["vision.patches"], golden["vision.grid_thw"],
                          max_new_tokens=len(rows[1]) + 2, stop_ids=[stop])
    assert new == [a[:1] + [stop], a + b + [stop]]


def test_answer_renders_the_chat_prompt(golden, ar, tok, monkeypatch):
    """answer(image, question) greedily continues the Qwen3-VL chat rendering (user turn: image then question,
    assistant turn opened) of the image resized by the released processor, and stops at the end tokens. The prompt
    and stop ids it hands to the model are checked too: the check holds on a fixture whose answer ends at once."""
    ar = own_copy(ar)
    v = ar.cfg.vision
    # the fixture states none: the released pixel bounds, the fixture's patch geometry
    ar.image_processor = P.ImageProcessorConfig(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                                temporal_patch_size=v.temporal_patch_size)
    img = golden["vision.image_uint8"].numpy()
    pv, grid = P.preprocess_image(img, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                  temporal_patch_size=v.temporal_patch_size)
    n_img = int(grid.prod()) // v.merge_unit
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_img +
            "<|vision_end|>what is it?<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = tok.batch([text])
    n = golden["und.greedy_ids"].shape[1]
    ends = sorted(end_ids_from_files(golden.dir))
    new = M.generate_text(ar, ids, mask, pv, grid, max_new_tokens=n, stop_ids=ends)
    calls, real = [], P.generate_text
    monkeypatch.setattr(P, "generate_text", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    assert P.answer(ar, tok, img, "what is it?", max_new_tokens=n) == tok.decode(new[0])
    (args, kw), = calls
    assert torch.equal(args[1], ids) and torch.equal(args[2], mask) and torch.equal(args[3], pv)
    assert torch.equal(args[4], grid) and sorted(kw["stop_ids"]) == ends


# ----- positions -----

@pytest.mark.parametrize("scenario", ["t2i", "edit", "e2e"])
def test_rope_index(golden, ar, cfg, scenario):
    ids, mask = golden[f"{scenario}.prefix_ids"], golden[f"{scenario}.attention_mask"]
    pos = golden[f"{scenario}.pos_ids_all"]
    n = pos.shape[-1] - ids.shape[1]
    gh, gw = out_grid(pos, n)
    grid = torch.cat([golden["vision.grid_thw"]] * ids.shape[0]) if scenario == "edit" else None
    ids_all, mask_all, grids = ar.append_image_placeholders(ids, mask, n, gh, gw, grid)
    assert torch.equal(M.get_rope_index(ids_all, grids, mask_all, cfg), pos)


# ----- text-to-image -----

def test_t2i_exact(golden, ar):
    """The cached rollout draws the official bits with the seed set right before the call; the official loop
    (visual-decoder stack re-run over the whole sequence, bench.generate_image_recompute) draws the same."""
    sc = golden.scenario("t2i")
    torch.manual_seed(seed_of(golden, "t2i.codes", "t2i"))
    s = sampler(sc["cfg"], sc["temperature"])
    out = M.generate_image(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                           sc["ar_width"], s)
    assert torch.equal(out.bits, golden["t2i.codes"])
    assert torch.equal(out.indices, golden["t2i.indices"])
    assert abs_err(s.step_logits, golden["t2i.step_logits"]) <= TOL
    torch.manual_seed(seed_of(golden, "t2i.codes", "t2i"))
    s = sampler(sc["cfg"], sc["temperature"])
    bits = generate_image_recompute(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                                    sc["ar_width"], s)
    assert torch.equal(bits[:out.bits.shape[0]], golden["t2i.codes"])
    assert abs_err(s.step_logits, golden["t2i.step_logits"]) <= TOL


def test_t2i_temperature_and_guidance_exact(golden, ar):
    """The t2i prompt and grid sampled at another temperature and guidance scale (golden.json "t2i_temp") with the
    seed set right before the call: the official bits."""
    sc, st = golden.scenario("t2i"), golden.scenario("t2i_temp")
    torch.manual_seed(seed_of(golden, "t2i_temp.codes", "t2i_temp"))
    out = M.generate_image(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                           sc["ar_width"], M.MultinomialSampler(st["cfg"], st["temperature"]))
    assert torch.equal(out.bits, golden["t2i_temp.codes"])
    assert torch.equal(out.indices, bsq.bits_to_indexes(golden["t2i_temp.codes"]))


def test_visual_decoder_cache_equals_recompute(golden, ar):
    """Same logits with and without the visual-decoder KV cache, here on a fresh seed and without guidance."""
    sc = golden.scenario("t2i")
    a = sampler(1.0, sc["temperature"], torch.Generator().manual_seed(123))
    out = M.generate_image(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                           sc["ar_width"], a)
    b = sampler(1.0, sc["temperature"], torch.Generator().manual_seed(123))
    bits = generate_image_recompute(ar, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                                    sc["ar_width"], b)
    assert torch.equal(out.bits, bits)
    assert abs_err(a.step_logits, b.step_logits) <= 1e-5


def test_teacher_forced_logits(golden, ar):
    codes = golden["t2i.codes"]
    ids, mask = golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1]
    gh, gw = out_grid(golden["t2i.pos_ids_all"], codes.shape[1])
    logits = ar.teacher_forced_logits(ids, mask, codes, (gh, gw))
    assert abs_err(logits, golden["t2i.teacher_forced_logits"]) <= TOL
    # and it equals the conditional row's generation logits (before guidance)
    step = golden["t2i.step_logits"][:1].view(logits.shape)
    assert abs_err(logits, step) <= TOL


def test_bit_logits_at_masked_positions_are_the_official_ones(golden, ar):
    """Training picks the positions the bit head reads with a bool mask (the last visual-decoder layer then computes
    only those): the logits there are the official teacher-forced ones, here with one extra position picked that the
    reference does not have (the last prefix token before <|vision_start|>), so the mask really skips some."""
    codes = golden["t2i.codes"]
    ids, mask = golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1]
    N, Lp = codes.shape[1], ids.shape[1]
    gh, gw = out_grid(golden["t2i.pos_ids_all"], N)
    full, fmask, grids = ar.append_image_placeholders(ids, mask, N, gh, gw)
    h, pos = ar.context_states(full, fmask, codes.reshape(-1, *ar.bits_shape), grids)
    where = torch.zeros_like(full, dtype=torch.bool)
    where[0, Lp - 2:Lp - 1 + N] = True
    logits = ar.bit_logits_of(h, pos, fmask, where)
    assert logits.shape[0] == N + 1
    assert abs_err(logits[1:], golden["t2i.teacher_forced_logits"][0]) <= TOL


# ----- editing -----

def test_edit_exact(golden, ar):
    ids, mask = golden["edit.prefix_ids"], golden["edit.attention_mask"]
    pos, codes = golden["edit.pos_ids_all"], golden["edit.codes"]
    gh, gw = out_grid(pos, codes.shape[1])
    sc = {**golden.scenario("t2i"), **golden.meta.get("edit", {})}  # t2i's settings unless an edit block says
    ds = M.UniARConfig.from_dict(golden.config).downsample
    pv = torch.cat([golden["vision.patches"]] * ids.shape[0])
    grid = torch.cat([golden["vision.grid_thw"]] * ids.shape[0])
    torch.manual_seed(seed_of(golden, "edit.codes", "edit"))
    s = sampler(sc["cfg"], sc["temperature"])
    out = M.generate_image(ar, ids, mask, gh * ds, gw * ds, s, pixel_values=pv, image_grid_thw=grid)
    assert torch.equal(out.bits, codes)
    # teacher forcing with the input image in the prefix gives the conditional row's generation logits
    n_rows = codes.shape[0]
    n_patches = golden["vision.patches"].shape[0]
    tf = ar.teacher_forced_logits(ids[:n_rows], mask[:n_rows], codes, (gh, gw), pv[: n_rows * n_patches],
                                  grid[:n_rows])
    assert abs_err(tf, s.step_logits[:n_rows].view(tf.shape)) <= TOL


# ----- from text -----

def test_e2e_prompt_to_indices(golden, ar, tok):
    sc = golden.scenario("e2e")
    ds = ar.cfg.downsample
    gh, gw = sc["ar_height"] // ds, sc["ar_width"] // ds
    texts = [P.render_generation_prompt(sc["prompt"], gh, gw), P.render_generation_prompt("", gh, gw)]
    assert texts == sc["rendered"]
    ids, mask = tok.batch(texts)
    assert torch.equal(ids, golden["e2e.prefix_ids"])
    assert torch.equal(mask, golden["e2e.attention_mask"])
    assert (ids[mask == 0] == tok.pad_id).all()
    bits = P.generate_bits(ar, tok, [sc["prompt"]], ar_height=sc["ar_height"], ar_width=sc["ar_width"],
                           cfg_scale=sc["cfg"], temperature=sc["temperature"], seed=seed_of(golden, "e2e.indices", "e2e"))
    assert torch.equal(bsq.bits_to_indexes(bits), golden["e2e.indices"])


def test_edit_from_prompt_and_image(golden, ar, tok):
    """The high-level edit path: every row carries the input image (resized to the AR size), seeded runs repeat."""
    sc = golden.scenario("e2e")
    v = ar.cfg.vision
    img = golden["vision.image_uint8"].numpy()
    ids, mask, pv, grid = P.build_generation_batch(ar, tok, [sc["prompt"]], sc["ar_height"], sc["ar_width"],
                                                   sc["cfg"], [img])
    n_tokens = (sc["ar_height"] // ar.cfg.downsample) * (sc["ar_width"] // ar.cfg.downsample)
    assert ((ids == ar.cfg.image_token_id).sum(1) == n_tokens).all()  # input image at the AR size, in every row
    one, g1 = P.preprocess_image(img, size=(sc["ar_height"], sc["ar_width"]), patch_size=v.patch_size,
                                 merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
    assert torch.equal(pv, torch.cat([one] * ids.shape[0])) and torch.equal(grid, torch.cat([g1] * ids.shape[0]))
    kw = dict(ar_height=sc["ar_height"], ar_width=sc["ar_width"], cfg_scale=sc["cfg"], temperature=sc["temperature"],
              seed=0, input_images=[img])
    a = P.generate_bits(ar, tok, [sc["prompt"]], **kw)
    torch.manual_seed(0)
    b = M.generate_image(ar, ids, mask, sc["ar_height"], sc["ar_width"],
                         M.MultinomialSampler(sc["cfg"], sc["temperature"]), pixel_values=pv, image_grid_thw=grid).bits
    assert torch.equal(a, b)


# ----- bad input -----

def test_bad_inputs(golden, ar, tok):
    """Bad generation arguments are refused where a person gives them (pipeline.generate_bits and its checks, with
    the messages the model gave before); inside the model they are asserts."""
    sc = golden.scenario("t2i")
    ids, mask = golden["t2i.prefix_ids"], golden["t2i.attention_mask"]
    H, W = sc["ar_height"], sc["ar_width"]
    ds = ar.cfg.downsample
    budget = ar.cfg.text.max_position_embeddings
    long = torch.zeros(2, budget, dtype=torch.int64)
    kw = dict(ar_height=H, ar_width=W, cfg_scale=sc["cfg"])
    with pytest.raises(ValueError, match="position budget"):
        P.generate_bits(ar, tok, (long, torch.ones_like(long)), **kw)
    with pytest.raises(ValueError, match=f"multiples of {ds}"):
        P.generate_bits(ar, tok, (ids, mask), **{**kw, "ar_height": H + ds // 2})
    with pytest.raises(ValueError, match=f"multiples of {ds}"):
        P.generate_bits(ar, tok, ["x"], ar_height=H, ar_width=W - 1)
    with pytest.raises(ValueError, match="cfg must be >= 1"):
        P.generate_bits(ar, tok, (ids, mask), **{**kw, "cfg_scale": 0.5})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        P.generate_bits(ar, tok, (ids, mask), **kw, temperature=0.0)
    # an image where none is expected: pixels for a prompt without placeholders, placeholders without pixels
    with pytest.raises(ValueError, match="none is expected"):
        P.check_prefix_images(ar, ids, golden["vision.patches"], golden["vision.grid_thw"])
    with pytest.raises(ValueError, match="no pixel_values"):
        P.generate_bits(ar, tok, (golden["edit.prefix_ids"], golden["edit.attention_mask"]), **kw)
    with pytest.raises(ValueError, match="prompts must be"):
        P.generate_bits(ar, tok, [], ar_height=H, ar_width=W)
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 = greedy\), got -1"):
        P.answer(ar, tok, None, "what?", temperature=-1)
    with pytest.raises(ValueError, match=f"new tokens exceeds the position budget max_position_embeddings={budget}"):
        P.answer(ar, tok, None, "what?", max_new_tokens=budget)
    # called directly, the model asserts what those checks make sure of
    with pytest.raises(AssertionError, match="position budget"):
        M.generate_image(ar, long, torch.ones_like(long), H, W, M.MultinomialSampler(sc["cfg"]))
    with pytest.raises(AssertionError, match="placeholders and pixels"):
        M.generate_image(ar, ids, mask, H, W, M.MultinomialSampler(sc["cfg"]), pixel_values=golden["vision.patches"],
                         image_grid_thw=golden["vision.grid_thw"])
    with pytest.raises(AssertionError):
        M.MultinomialSampler(0.5)
    with pytest.raises(AssertionError):
        M.generate_text(ar, ids[:1], mask[:1], max_new_tokens=budget)
    with pytest.raises(AssertionError, match="bits must be"):
        ar.teacher_forced_logits(ids[:1], mask[:1], golden["t2i.codes"][:, :1], out_grid(golden["t2i.pos_ids_all"],
                                                                                        golden["t2i.codes"].shape[1]))


@pytest.mark.parametrize("variant", M.HEAD_VARIANTS)
def test_head_variants_generation_matches_teacher_forcing(golden, cfg, variant):
    """Every bit-head variant: cached rollout == recompute rollout, and teacher forcing on its bits gives its logits."""
    torch.manual_seed(0)
    m = M.UniAR(cfg.with_head_variant(variant)).eval()
    sc = golden.scenario("t2i")
    ids, mask = golden["t2i.prefix_ids"], golden["t2i.attention_mask"]
    a, b = (sampler(1.0, 1.0, torch.Generator().manual_seed(1)) for _ in range(2))
    bits = M.generate_image(m, ids, mask, sc["ar_height"], sc["ar_width"], a).bits
    assert torch.equal(bits, generate_image_recompute(m, ids, mask, sc["ar_height"], sc["ar_width"], b))
    assert abs_err(a.step_logits, b.step_logits) <= 1e-5
    gh, gw = out_grid(golden["t2i.pos_ids_all"], bits.shape[1])
    tf = m.teacher_forced_logits(ids, mask, bits, (gh, gw))
    assert abs_err(tf, a.step_logits.view(tf.shape)) <= TOL


def plain_bit_head(variant: str, sd: dict, h: torch.Tensor, eps: float) -> torch.Tensor:
    """The bit head in plain torch ops from its weights: [RMSNorm ->] Linear [-> GELU(tanh) -> Linear], no bias."""
    w = {k[len("output_layer_vistok."):]: v for k, v in sd.items() if k.startswith("output_layer_vistok.")}
    h = h.double()
    if variant == "linear":
        return h @ w["weight"].double().T
    x = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w["0.weight"].double()
    x = x @ w["1.weight"].double().T
    if variant == "rmsnorm_linear":
        return x
    x = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return x @ w["3.weight"].double().T


def bit_head_inputs(ar, bits, golden):
    """The visual-decoder states the fixture model feeds its bit head when teacher forcing `bits` on the t2i
    conditional row (they do not depend on the head)."""
    seen = []
    hook = ar.output_layer_vistok.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    try:
        ar.teacher_forced_logits(golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1], bits,
                                 out_grid(golden["t2i.pos_ids_all"], bits.shape[1]))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("variant", M.HEAD_VARIANTS)
def test_bit_head_variants_against_plain_torch(golden, ar, cfg, variant):
    """Each bit-head variant on the fixture's backbone (random head weights, RMSNorm gain too) gives the logits of
    a plain-torch head on the fixture's visual-decoder states, both teacher-forced and per generation step; the
    same plain head with the fixture's own weights reproduces the official teacher-forced logits."""
    eps = cfg.text.rms_norm_eps
    codes = golden["t2i.codes"]
    states = bit_head_inputs(ar, codes, golden)
    official = golden["t2i.teacher_forced_logits"]
    assert abs_err(plain_bit_head(cfg.head_variant, ar.state_dict(), states, eps).view(official.shape), official) <= TOL

    m = copy.deepcopy(ar)
    m.cfg = cfg.with_head_variant(variant)
    with torch.device("meta"):
        m.output_layer_vistok = M.build_vistok_head(m.cfg)
    m.output_layer_vistok.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.output_layer_vistok.parameters():  # norm gains around 1, linear weights of unit output scale
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if p.dim() == 1 else
                    torch.randn(p.shape, generator=g) * 2 / math.sqrt(p.shape[1]))
    assert load_hf.head_variant_from_keys(m.state_dict()) == variant
    sd = m.state_dict()
    tf = m.teacher_forced_logits(golden["t2i.prefix_ids"][:1], golden["t2i.attention_mask"][:1], codes,
                                 out_grid(golden["t2i.pos_ids_all"], codes.shape[1]))
    assert_close_rel(tf.flatten(-4), plain_bit_head(variant, sd, states, eps), 1e-5, variant)
    sc = golden.scenario("t2i")
    s = sampler(sc["cfg"], 1.0, torch.Generator().manual_seed(1))
    out = M.generate_image(m, golden["t2i.prefix_ids"], golden["t2i.attention_mask"], sc["ar_height"],
                           sc["ar_width"], s)
    want = plain_bit_head(variant, sd, bit_head_inputs(ar, out.bits, golden), eps)
    assert_close_rel(s.step_logits[:1], want, 1e-5, variant)


# ----- MRoPE, worked out by hand -----

def test_mrope_positions_worked_example(cfg):
    """Text, a 2x2-token image (a 4x4 patch grid), text, left padded by two: the ids written out. The image's tokens
    sit at (s, s + row, s + col) with s = 3, the id after the text before it; the text after it continues at
    s + max(rows, cols) = 5 on all three axes; padding gets 1."""
    vs, img, ve = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    special = {vs, img, ve, cfg.video_token_id}
    t1, t2, t3 = [i for i in range(7, 7 + len(special) + 3) if i not in special][:3]  # plain text ids
    ms = cfg.vision.spatial_merge_size
    grid = (1, 2 * ms, 2 * ms)  # 2x2 tokens (4x4 patches when merging 2x2)
    row = [t1, t2, vs, img, img, img, img, ve, t3]
    ids = torch.tensor([[t1, t1] + row])  # the padding's ids are masked out
    mask = torch.tensor([[0, 0] + [1] * len(row)])
    pos = M.get_rope_index(ids, torch.tensor([grid]), mask, cfg)
    assert pos[:, 0].tolist() == [[1, 1, 0, 1, 2, 3, 3, 3, 3, 5, 6],   # t
                                  [1, 1, 0, 1, 2, 3, 3, 4, 4, 5, 6],   # h
                                  [1, 1, 0, 1, 2, 3, 4, 3, 4, 5, 6]]   # w
    assert M.row_positions(row, iter([grid]), 10, cfg)[1] == 10 + 7  # the next free position after the row


def test_mrope_frequencies_interleave_t_h_w(cfg):
    """Interleaved MRoPE: frequency j reads the h position when j % 3 == 1 (j < 3 * section[1]), the w position when
    j % 3 == 2 (j < 3 * section[2]), the t position otherwise (THWTHW...TT)."""
    tc = cfg.text
    inv = M.mrope_inv_freq(tc)
    pos = torch.tensor([10, 200, 3000]).view(3, 1, 1)
    cos, _ = M.mrope_cos_sin(pos, inv, tc.mrope_section, torch.float64)
    sec = tc.mrope_section
    axis = [1 if j % 3 == 1 and j < 3 * sec[1] else 2 if j % 3 == 2 and j < 3 * sec[2] else 0
            for j in range(tc.head_dim // 2)]
    want = torch.tensor([float([10, 200, 3000][a]) for a in axis]) * inv
    assert torch.allclose(cos[0, 0, :tc.head_dim // 2].double(), torch.cos(want.float()).double(), atol=1e-6)
    assert {0, 1, 2} <= set(axis)
