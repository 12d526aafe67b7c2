"""Load the released UniAR checkpoints (ShareLab-SII/UniAR-SFT, UniAR-RL) and this project's own, unchanged.

Released layout (one folder; each part may also be given by its own path):

    <root>/config.json, model*.safetensors[.index.json], tokenizer files   the AR model (model_type "uniar")
    <root>/bsq_encoder/                                                    the tokenizer copy the decoder uses
    <root>/sd3_transformer/config.json, diffusion_pytorch_model*.safetensors   the MMDiT decoder
    <root>/sd3_pipeline/vae/, scheduler/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/   SD3 pipeline parts

How a part is loaded: its config file is checked against its schema (`config_schema.py`: every field that sets a
shape or a computation is required, each value's type and range are checked) and parsed into the project's
dataclass, the module is built on the meta device (no memory), every tensor is read from memory-mapped safetensors
through a declarative key map (explicit drops, tied names), converted to the requested dtype one tensor at a time, and
assigned in place. Missing, unexpected and mis-shaped keys, tensors of a dtype the module cannot take (an int8 or
bool tensor where a float weight belongs) and weights holding NaN or inf are all reported in one error naming the
file and the tensors; a shard index must agree with the shards' headers. Loading therefore never holds two copies
of the weights, and a damaged checkpoint is an error, never wrong images.

Before any weights: a missing part (bsq_encoder/, sd3_transformer/, sd3_pipeline/scheduler/, the VAE of a latent
decoder) is named as such, never stood in for by the root's own config.json; the tokenizer files are read and checked
(not JSON, wrong shape, truncated: an error naming the file), and config.json's token ids must be the ids the
tokenizer gives <|image_pad|>, <|video_pad|>, <|vision_start|> and <|vision_end|>. A save of the folder killed after
its journal commit is finished first (files.finish_interrupted_save); nothing is written when there is none to finish.
Every error is one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bsq
import config_schema as schema
import decoder as D
import files
import model as M
import pipeline as P
import text_encoders as TE

EXPECTED_LAYOUT = """expected layout of a UniAR checkpoint folder:
  <root>/config.json + model.safetensors (or model.safetensors.index.json + shards) + tokenizer.json ...
  <root>/bsq_encoder/config.json + model.safetensors
  <root>/sd3_transformer/config.json + diffusion_pytorch_model.safetensors
  <root>/sd3_pipeline/vae/, scheduler/ (+ text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/)"""


class CheckpointError(ValueError):
    """A checkpoint folder, file, key or value that cannot be loaded; the message names it."""


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def download_command(repo_id: str) -> str:
    return (f"pip install huggingface_hub && huggingface-cli download {repo_id} --local-dir {repo_id.split('/')[1]}"
            f", then --ckpt {repo_id.split('/')[1]}")


def resolve_checkpoint(name) -> Path:
    """A checkpoint folder, or a Hugging Face hub id ("ShareLab-SII/UniAR-RL") resolved through the local hub cache
    when the optional `huggingface_hub` is installed (it honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1; online
    it downloads what the cache lacks). An existing folder always wins over a hub id of the same spelling."""
    path = Path(name)
    if path.exists() or not HUB_ID.match(str(name)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name} is not a folder here, and resolving it as a hub id needs the optional "
                              f"huggingface_hub; download it with: {download_command(str(name))}") from None
    try:
        return Path(snapshot_download(str(name)))
    except Exception as e:  # offline and not cached, unknown repository, network errors: one message
        raise CheckpointError(f"{name}: not a folder here and not resolvable on the hub or in its cache "
                              f"({type(e).__name__}); download it with: {download_command(str(name))}") from None


# The sub-folders of a checkpoint root and what each holds (for the message when one is missing).
PARTS = {"bsq_encoder": "the decoder's copy of the visual tokenizer: bsq_encoder/config.json + model.safetensors",
         "sd3_transformer": "the diffusion decoder: sd3_transformer/config.json + diffusion_pytorch_model.safetensors",
         "sd3_pipeline": "the decoder's scheduler/ and vae/"}
INCOMPLETE = "the checkpoint is incomplete: download it again"
LAYOUT = "config.json, model.safetensors, tokenizer.json, bsq_encoder/, sd3_transformer/, sd3_pipeline/"  # one line


def finish_interrupted_save(root) -> None:
    """files.finish_interrupted_save as a CheckpointError: a save killed mid-switch is finished before anything is
    read (nothing is written when there is none to finish)."""
    try:
        files.finish_interrupted_save(root)
    except files.UsageError as e:
        raise CheckpointError(str(e)) from None


def _is_checkpoint_root(root: Path) -> bool:
    """Whether `root` is the root of a whole checkpoint (a decoder part then lives in its sub-folder, never in the
    root itself): it has one of the parts' sub-folders, or its config.json is the AR model's."""
    if any((root / sub).is_dir() for sub in PARTS):
        return True
    try:
        d = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and (d.get("model_type") == "uniar" or "text_config" in d)


def resolve_part(root, sub: str, marker: str = "config.json") -> Path:
    """`root/sub` if it is a folder, else `root` itself when it holds the part (as the official loader does; never
    for a decoder part of a whole checkpoint's root). A save of `root` killed mid-switch is finished first."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder not found: {root}; give the folder a checkpoint was downloaded to "
                              f"(expected layout: {LAYOUT})")
    finish_interrupted_save(root)  # a save was killed mid-switch: finish it before reading
    part = root / sub
    if part.is_dir():
        if (part / marker).exists():
            return part
        raise CheckpointError(f"{part / marker} not found ({PARTS.get(sub, 'the AR model')}); {INCOMPLETE}, or copy "
                              f"{sub}/ from a complete copy")
    if (root / marker).exists() and (sub not in PARTS or not _is_checkpoint_root(root)):
        return root
    if sub in PARTS and _is_checkpoint_root(root):
        raise CheckpointError(f"{root}: the checkpoint has no {sub}/ folder ({PARTS[sub]}); {INCOMPLETE}, or copy "
                              f"{sub}/ from a complete copy")
    if sub not in PARTS and _is_checkpoint_root(root):
        raise CheckpointError(f"{root / marker} not found (the AR model's config); {INCOMPLETE}")
    raise CheckpointError(f"{root}: not a UniAR checkpoint folder (part '{sub}' not found: neither {part / marker} "
                          f"nor {root / marker} exists); give the folder a checkpoint was downloaded to (expected "
                          f"layout: {LAYOUT})")


def read_config(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found; {INCOMPLETE}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the checkpoint's original file "
                              "(download it again)") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); make it readable, or download the "
                              "checkpoint again") from None


def checked_config(d, where, check: Callable, *args) -> dict:
    """`check(d, where, *args)` from config_schema: the file's contents with the defaults of absent optional fields
    filled in, or a CheckpointError naming the file and the field."""
    try:
        return check(d, where, *args)
    except schema.ConfigError as e:
        raise CheckpointError(str(e)) from None


def weight_files(folder, stem: str = "model") -> list[Path]:
    """The safetensors files of one part: `<stem>.safetensors`, or the shards named by `<stem>.safetensors.index.json`
    (checked against the shards' headers: every key it maps must be in the shard it names, every key of a shard
    must be mapped to that shard)."""
    folder = Path(folder)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        return _index_shards(index)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return [folder / found[0]]
    raise CheckpointError(f"no weights in {folder}: expected {single.name} or {index.name}"
                          + (f" (found {found})" if found else ""))


def _index_shards(index: Path) -> list[Path]:
    d = read_config(index)
    wmap = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty JSON object {{tensor key: shard "
                              f"file}}, got {json.dumps(wmap)[:80]}")
    for k, v in wmap.items():
        if not isinstance(v, str) or not v or Path(v).name != v:
            raise CheckpointError(f"{index}: weight_map['{k}'] must be the file name of a shard in {index.parent}, "
                                  f"got {json.dumps(v)[:80]}")
    shards = sorted(set(wmap.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shards that are missing: {missing}")
    held = {}  # key -> the shard whose header holds it
    for s in shards:
        with _open(index.parent / s) as st:
            for k in st.keys():
                if k in held:
                    raise CheckpointError(f"{index}: key '{k}' appears in both {held[k]} and {s}")
                held[k] = s
    for k, s in wmap.items():
        if held.get(k) != s:
            where = f"it is in {held[k]}" if k in held else "no shard holds it"
            raise CheckpointError(f"{index}: weight_map maps '{k}' to {s}, but that shard does not hold it ({where}); "
                                  "the index does not belong to these shards: re-download the index and the shards")
    for k, s in held.items():
        if k not in wmap:
            raise CheckpointError(f"{index}: shard {s} holds '{k}', which the weight_map does not list; the index does "
                                  "not belong to these shards: re-download the index and the shards")
    return [index.parent / s for s in shards]


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers / truncated files
        raise CheckpointError(f"{path}: not a readable safetensors file, corrupt or truncated ({e})") from None


class TensorInfo(NamedTuple):
    file: Path
    shape: list[int]
    dtype: str  # safetensors' name: "F32", "BF16", "I64", "I8", "BOOL", ...


def tensor_index(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """{key: (file, shape, dtype)} over all shards, from the headers only."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        with _open(f) as st:
            for k in st.keys():
                if k in out:
                    raise CheckpointError(f"key {k} appears in both {out[k].file.name} and {f.name}")
                sl = st.get_slice(k)
                out[k] = TensorInfo(f, list(sl.get_shape()), sl.get_dtype())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Key maps and strict loading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class KeyMap:
    """How file keys meet module keys, which are the same names (the modules mirror the released keys): `drop` lists
    regexes of file keys that are deliberately not loaded (each documented where the map is defined); `alias` maps a
    module key to a file key it is tied to (e.g. T5's embed_tokens <- shared)."""

    drop: list[str] = field(default_factory=list)
    alias: dict[str, str] = field(default_factory=dict)

    def dropped(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.drop)


@dataclass
class LoadReport:
    loaded: int
    dropped: list[str]


def plan_load(module_shapes: dict[str, list[int]], file_shapes: dict[str, list[int]], keymap: KeyMap,
              where: str = "checkpoint") -> dict[str, str]:
    """Match file keys to module keys. Returns {module key: file key}; raises one CheckpointError listing every
    missing, unexpected and mis-shaped key."""
    plan, unexpected, mismatched, seen = {}, [], [], set()
    for k, shape in file_shapes.items():
        if keymap.dropped(k):
            continue
        if k not in module_shapes:
            unexpected.append(k)
        elif list(module_shapes[k]) != list(shape):
            seen.add(k)
            mismatched.append(f"{k}: file {list(shape)} vs model {list(module_shapes[k])}")
        else:
            plan[k] = k
    for mk, fk in keymap.alias.items():
        if mk not in plan and fk in file_shapes and mk in module_shapes:
            plan[mk] = fk
    missing = [k for k in module_shapes if k not in plan and k not in seen]
    if missing or unexpected or mismatched:
        lines = [f"cannot load {where}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
        raise CheckpointError("\n".join(lines))
    return plan


def module_shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# safetensors dtype names as torch spells them, for messages; a floating-point weight may be stored in any of
# FLOAT_DTYPES (it is converted on load), an integer buffer only in its own dtype.
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool"}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _listed(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def check_dtypes(module: nn.Module, index: dict[str, TensorInfo], plan: dict[str, str], where: str) -> None:
    """Each planned tensor's stored dtype against what its place in the module takes: a floating-point weight needs
    a float dtype of FLOAT_DTYPES (an int8 / bool / float8 tensor is refused, not cast), an integer buffer its own
    integer dtype. One CheckpointError naming the tensors and their files."""
    want = {k: v.dtype for k, v in module.state_dict().items()}
    bad = []
    for mk, fk in plan.items():
        info, w = index[fk], want[mk]
        have = DTYPE_NAMES.get(info.dtype, info.dtype)
        if w.is_floating_point and info.dtype not in FLOAT_DTYPES:
            bad.append(f"'{fk}' in {info.file.name} is {have}, but it is a floating-point weight: store it as "
                       "float32, float16 or bfloat16 (quantized checkpoints are not supported)")
        elif not w.is_floating_point and have != str(w).removeprefix("torch."):
            bad.append(f"'{fk}' in {info.file.name} is {have}, but it is an integer buffer: store it as "
                       f"{str(w).removeprefix('torch.')}")
    if bad:
        raise CheckpointError(f"cannot load {where}: {_listed(bad)}")


def finite_check_default() -> bool:
    """Whether load_weights checks that every weight is finite when not told: yes, unless the environment sets
    UNIAR_SKIP_FINITE_CHECK=1."""
    return os.environ.get("UNIAR_SKIP_FINITE_CHECK", "") not in ("1", "true", "yes")


def load_weights(module: nn.Module, files: list[Path], keymap: KeyMap | None = None, *, dtype=None,
                 device="cpu", where: str | None = None, only: Callable[[str], bool] | None = None,
                 check_finite: bool | None = None) -> LoadReport:
    """Fill `module` (typically built on the meta device) from safetensors `files`, strictly.

    Floating tensors are converted to `dtype` (None keeps the file's), integer buffers keep theirs. `only` restricts
    loading to module keys it accepts (the others stay as built, e.g. on meta, and must not be used).
    check_finite (default: `finite_check_default()`): every floating tensor, as loaded (converted), must hold no NaN
    or inf; one min/max reduction per tensor, read once the tensor is in place, so the check costs no memory.
    """
    keymap = keymap or KeyMap()
    where = where or ", ".join(str(f) for f in files)
    check_finite = finite_check_default() if check_finite is None else check_finite
    index = tensor_index(files)
    shapes = module_shapes(module)
    if only is not None:
        shapes = {k: v for k, v in shapes.items() if only(k)}
        keymap = KeyMap(drop=keymap.drop + [re.escape(k) for k in index if not only(k)], alias=keymap.alias)
    plan = plan_load(shapes, {k: info.shape for k, info in index.items()}, keymap, where)
    check_dtypes(module, index, plan, where)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for mk, fk in plan.items():
        by_file.setdefault(index[fk].file, []).append((mk, fk))
    state, finite = {}, []  # finite: (file key, 0-d bool tensor), read in one go at the end (one device sync)
    for f, pairs in by_file.items():
        # Tensors come from a memory map. When they are converted (dtype / device), the mapped pages already read
        # are dropped by reopening the map every ~256 MiB, so the peak stays near the size of the result.
        st, mapped = _open(f), 0
        for mk, fk in pairs:
            try:
                t = st.get_tensor(fk)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor {fk}: corrupt or truncated ({e})") from None
            src = t
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.to(device)
            state[mk] = t
            if check_finite and t.is_floating_point() and t.numel():
                lo, hi = torch.aminmax(t)  # NaN propagates into both; +-inf shows in one
                finite.append((fk, torch.isfinite(lo) & torch.isfinite(hi)))
            if t.data_ptr() != src.data_ptr():
                mapped += src.numel() * src.element_size()
                del src
                if mapped > 2**28:
                    st.__exit__(None, None, None)
                    st, mapped = _open(f), 0
        st.__exit__(None, None, None)
    if finite:
        ok = torch.stack([v for _, v in finite]).tolist()
        bad = [fk for (fk, _), good in zip(finite, ok) if not good]
        if bad:
            raise CheckpointError(_non_finite_message(bad, index, dtype, where))
    _assign(module, state)
    dropped = sorted(k for k in index if keymap.dropped(k))
    return LoadReport(loaded=len(state), dropped=dropped)


def _non_finite_message(keys: list[str], index: dict[str, TensorInfo], dtype, where: str) -> str:
    """NaN / inf in the file (a damaged checkpoint), or values the conversion to `dtype` overflowed."""
    damaged, overflowed = [], []
    for fk in keys:
        info = index[fk]
        with _open(info.file) as st:
            lo, hi = torch.aminmax(st.get_tensor(fk))
        (damaged if not (torch.isfinite(lo) and torch.isfinite(hi)) else overflowed).append(f"'{fk}' in "
                                                                                             f"{info.file.name}")
    parts = []
    if damaged:
        parts.append(f"NaN or inf values in {_listed(damaged)}; the checkpoint is damaged: download it again")
    if overflowed:
        name = str(dtype).removeprefix("torch.")
        parts.append(f"values beyond the range of {name} in {_listed(overflowed)} (they became inf on conversion); "
                     "load in bfloat16 or float32")
    return f"cannot load {where}: " + "; ".join(parts)


def _assign(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replace parameters / buffers in place by the given tensors (no copy: the module takes ownership)."""
    for key, t in state.items():
        mod_name, _, name = key.rpartition(".")
        mod = module.get_submodule(mod_name) if mod_name else module
        if name in mod._parameters:
            old = mod._parameters[name]
            mod._parameters[name] = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else True)
        elif name in mod._buffers:
            mod._buffers[name] = t
        else:
            raise CheckpointError(f"module has no parameter or buffer {key}")


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """factory() on the meta device, without random initialisation: the weights come from the files, and
    nn.init.normal_ on a meta tensor imports torch._dynamo, which slows the start."""
    normal = nn.init.normal_
    nn.init.normal_ = lambda t, *a, **k: t if t.is_meta else normal(t, *a, **k)
    try:
        with torch.device("meta"):
            return factory()
    finally:
        nn.init.normal_ = normal


# ---------------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------------


def load_vision(folder, *, dtype=None, device="cpu", decoder_only: bool = False):
    """`bsq_encoder/` (or any folder holding a UniARVisionModel) -> bsq.VisionModel.

    decoder_only: the diffusion decoder reads only the BSQ output projections, so only `bsq_output_proj*` is
    loaded; every other key is dropped on purpose (the official loader passes ignore_mismatched_sizes for this
    part, so its other tensors are not relied on) and the rest of the module stays on the meta device.
    """

    folder = resolve_part(folder, "bsq_encoder")
    cfg = vision_config(read_config(folder / "config.json"), folder / "config.json")
    model = build_on_meta(lambda: bsq.VisionModel(cfg))
    only = (lambda k: k.startswith("bsq_output_proj")) if decoder_only else None
    load_weights(model, weight_files(folder), dtype=dtype, device=device, where=str(folder), only=only)
    return model.eval()


def vision_config(d: dict, where):
    """A vision config (bsq_encoder/config.json, or the root's vision_config) -> bsq.VisionConfig, checked."""

    d = checked_config(d, where, schema.check_vision)
    try:
        return bsq.VisionConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid vision config ({e})") from None


# The AR root: module names mirror the released keys, so the map is the identity. A key saved by transformers for a
# non-persistent rotary table would be dropped (none is in the released manifest).
AR_KEYMAP = KeyMap(drop=[r".*rotary_emb\.inv_freq", r".*rotary_pos_emb\.inv_freq"])


# The config.json fields that name a token, and the token the tokenizer files give that id.
TOKEN_FIELDS = {"image_token_id": P.IMAGE_PAD, "video_token_id": "<|video_pad|>",
                "vision_start_token_id": P.VISION_START, "vision_end_token_id": P.VISION_END}
RESTORE_TOKENIZER = "restore it from the checkpoint's original file (download it again)"


def read_tokenizer(root) -> "P.Tokenizer":
    """The AR model's tokenizer (pipeline.Tokenizer) from the checkpoint's tokenizer files, each checked first: a
    file that is not JSON, JSON of the wrong shape or a truncated tokenizer.json is a CheckpointError naming it."""
    root = Path(root)
    path = root / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found (the AR model's tokenizer); {INCOMPLETE}")
    for name, check in (("special_tokens_map.json", lambda d, w: schema.check(d, w, schema.SPECIAL_TOKENS)),
                        ("tokenizer_config.json", lambda d, w: schema.check(d, w, schema.SPECIAL_TOKENS)),
                        ("added_tokens.json", schema.check_added_tokens),
                        ("generation_config.json", lambda d, w: schema.check(d, w, schema.GENERATION))):
        if (root / name).exists():
            d = read_config(root / name)
            try:
                check(d, root / name)
            except schema.ConfigError as e:
                raise CheckpointError(f"{e}; {RESTORE_TOKENIZER}") from None
    try:
        return P.Tokenizer(root)
    except ValueError as e:
        raise CheckpointError(f"{root}: tokenizer files: {e}; restore them from the checkpoint's original files"
                              ) from None
    except Exception as e:  # the tokenizers library: one plain Exception for every unreadable tokenizer.json
        if type(e) is not Exception:
            raise
        why = " ".join(str(e).split())
        raise CheckpointError(f"{path} is not a readable tokenizer file ({why}); {RESTORE_TOKENIZER}") from None


def check_tokenizer(path: Path, cfg, tok: "P.Tokenizer") -> None:
    """The root config.json (`path`, parsed as `cfg`) against the checkpoint's tokenizer: each token-id field must be
    the id the tokenizer files give its token (<|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>),
    added_tokens.json must agree with tokenizer.json, and every token id must have a row in the embedding
    (text_config.vocab_size). A config from another checkpoint would otherwise run and draw wrong images."""
    root = path.parent
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    added = read_config(root / "added_tokens.json") if (root / "added_tokens.json").is_file() else {}
    for t, i in added.items():
        if vocab.get(t, i) != i:
            raise CheckpointError(f"{root / 'added_tokens.json'} gives {t} the id {i}, but {root / 'tokenizer.json'} "
                                  f"gives it {vocab[t]}; the tokenizer files are from different checkpoints: restore "
                                  "them from the checkpoint's original files")
    ids = {**vocab, **added}

    def source(token):
        return root / ("tokenizer.json" if token in vocab else "added_tokens.json")

    have = {}
    for name, token in TOKEN_FIELDS.items():
        got, want = getattr(cfg, name), ids.get(token)
        if want is None:  # a tokenizer without this token (only <|video_pad|> may be absent: pipeline.Tokenizer)
            other = next((t for t, i in ids.items() if i == got), None)
            if other is not None:
                raise CheckpointError(f"{path}: field '{name}' is {got}, but the tokenizer has no {token} and gives "
                                      f"that id to {other!r} ({source(other).name}); the config and the tokenizer "
                                      "files disagree: restore them from the checkpoint's original files")
            continue
        if want in have:
            raise CheckpointError(f"{source(token)}: {have[want]} and {token} have the same id {want}; the tokenizer "
                                  f"file is damaged: {RESTORE_TOKENIZER}")
        have[want] = token
        if got != want:
            raise CheckpointError(f"{path}: field '{name}' is {got}, but the tokenizer ({source(token).name}) gives "
                                  f"{token} the id {want}; the config and the tokenizer files disagree: restore them "
                                  "from the checkpoint's original files")
    top, vocab_size = max(ids.items(), key=lambda kv: kv[1]), cfg.text.vocab_size
    if top[1] >= vocab_size:
        raise CheckpointError(f"{path}: field 'text_config.vocab_size' is {vocab_size}, but the tokenizer has token "
                              f"ids up to {top[1]} ({top[0]!r} in {source(top[0]).name}), which the embedding has no "
                              "row for; the config and the tokenizer files disagree: restore them from the "
                              "checkpoint's original files")


def head_variant_from_keys(keys) -> str:
    """Which bit head (model.HEAD_VARIANTS, model.build_vistok_head) a state dict holds, from its
    `output_layer_vistok.*` keys."""
    keys = {k for k in keys if k.startswith("output_layer_vistok.")}
    if keys == {"output_layer_vistok.weight"}:
        return "linear"
    if keys == {"output_layer_vistok.0.weight", "output_layer_vistok.1.weight"}:
        return "rmsnorm_linear"
    if keys == {"output_layer_vistok.0.weight", "output_layer_vistok.1.weight", "output_layer_vistok.3.weight"}:
        return "rmsnorm_mlp"
    raise ValueError(f"unrecognised output_layer_vistok keys {sorted(keys)}")


def _ar_config(root: Path):
    """(model.UniARConfig, pipeline.Tokenizer) of the AR root, checked: config.json against its schema and against
    the tokenizer files; the bit-head variant read from the keys."""
    root = Path(root)
    finish_interrupted_save(root)
    path = root / "config.json"
    d = checked_config(read_config(path), path, schema.check_ar)
    try:
        cfg = M.UniARConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None
    tok = read_tokenizer(root)
    check_tokenizer(path, cfg, tok)
    keys = tensor_index(weight_files(root)).keys()
    try:
        variant = head_variant_from_keys(keys)
    except ValueError as e:
        raise CheckpointError(f"{root}: unknown bit-head variant: {e}") from None
    if variant != cfg.head_variant:
        cfg = cfg.with_head_variant(variant)
    return cfg, tok


def ar_config(root: Path):
    """The root config.json -> model.UniARConfig, validated (also against the checkpoint's tokenizer files, see
    `check_tokenizer`); the bit-head variant is read from the keys when the config's flags do not say (or disagree
    with the file)."""
    return _ar_config(root)[0]


def image_processor_config(root: Path, vcfg):
    """`<root>/preprocessor_config.json` -> pipeline.ImageProcessorConfig (checked against the vision config), or None
    when the file is absent: then, as with the official loader (AutoProcessor finds only a tokenizer there), the
    checkpoint has no image preprocessing and understanding refuses images (pipeline.image_processor says so)."""

    path = Path(root) / P.PREPROCESSOR_CONFIG
    if not path.is_file():
        return None
    try:
        proc = P.ImageProcessorConfig.from_dict(read_config(path), path)
        proc.check_vision(vcfg, path)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return proc


def load_ar(root, *, dtype=None, device="cpu"):
    """The AR model at the checkpoint root (or an `ar_model/` folder) -> (model.UniAR, pipeline.Tokenizer). The model
    carries the checkpoint's image preprocessing (`net.image_processor`, from preprocessor_config.json)."""

    root = resolve_part(root, "ar_model")
    cfg, tok = _ar_config(root)  # the tokenizer files are checked with the config, before any weights load
    proc = image_processor_config(root, cfg.vision)
    net = build_on_meta(lambda: M.UniAR(cfg))
    net.image_processor = proc
    load_weights(net, weight_files(root), AR_KEYMAP, dtype=dtype, device=device, where=str(root))
    return net.eval(), tok


# The VAE file holds the whole AutoencoderKL; decoding needs only its `decoder.*` half, so the encoder half is dropped
# on purpose. (A VAE with post_quant_conv weights is reported as unexpected keys: only the SD3 VAE is supported.)
VAE_KEYMAP = KeyMap(drop=[r"encoder\..*", r"quant_conv\..*"])
# T5 stores one embedding table under two tied names; files may hold either or both.
T5_KEYMAP = KeyMap(alias={"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "encoder.embed_tokens.weight"})


def _pipeline_dir(root) -> Path:
    root = Path(root)
    finish_interrupted_save(root)
    pipe = root / "sd3_pipeline"
    if pipe.is_dir():
        if not (pipe / "scheduler").is_dir():
            raise CheckpointError(f"{pipe}: no scheduler/ folder (the decoder's sampling schedule: "
                                  f"scheduler/scheduler_config.json); {INCOMPLETE}, or copy sd3_pipeline/scheduler/ "
                                  "from a complete copy")
        if not (pipe / "scheduler" / "scheduler_config.json").exists():
            raise CheckpointError(f"{pipe / 'scheduler' / 'scheduler_config.json'} not found (the decoder's sampling "
                                  f"schedule); {INCOMPLETE}, or copy sd3_pipeline/scheduler/ from a complete copy")
        return pipe
    if (root / "scheduler").is_dir():  # the pipeline's parts given at the root itself
        return root
    raise CheckpointError(f"{root}: the checkpoint has no sd3_pipeline/ folder ({PARTS['sd3_pipeline']}); "
                          f"{INCOMPLETE}, or copy sd3_pipeline/ from a complete copy")


# A project checkpoint may store the decoder's (learned or precomputed) prompt embeddings instead of text encoders.
PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"


def _read_prompt_embeds(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A project checkpoint's stored decoder prompt embeddings (`prompt_embeds`, `pooled`): floating point and,
    unless UNIAR_SKIP_FINITE_CHECK says otherwise, finite, as every weight."""
    info = tensor_index([path])
    out = []
    for k in ("prompt_embeds", "pooled"):
        if k not in info:
            raise CheckpointError(f"{path}: no tensor '{k}' (the file holds {sorted(info)})")
        if info[k].dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor '{k}' is {DTYPE_NAMES.get(info[k].dtype, info[k].dtype)}; store "
                                  "it as float32, float16 or bfloat16")
        with _open(path) as st:
            t = st.get_tensor(k)
        if finite_check_default() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: NaN or inf values in '{k}'; the checkpoint is damaged: download it again")
        out.append(t)
    return out[0], out[1]


def _part(factory_cfg, path: Path, check: Callable, *args):
    """Config file -> checked against its schema (config_schema) -> the project's config dataclass."""
    d = checked_config(read_config(path), path, check, *args)
    try:
        return factory_cfg(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None


def transformer_config(root):
    """`sd3_transformer/config.json` -> decoder.MMDiTConfig, checked. A pixel-space decoder (no sd3_pipeline/vae/,
    this project's own) must state its prediction_type and make 3 channels; the released layout's has none and
    predicts velocity. The decoder's other parts must be there too (bsq_encoder/, sd3_pipeline/scheduler/, the VAE
    of a latent decoder): a checkpoint that lacks one is refused from its configs, before any weights load."""

    path = resolve_part(root, "sd3_transformer") / "config.json"
    resolve_part(root, "bsq_encoder")
    pipe = _pipeline_dir(root)
    pixel_space = not (pipe / "vae").is_dir()
    d = read_config(path)
    channels = d.get("out_channels") if isinstance(d, dict) else None
    if pixel_space and type(channels) is int and channels != 3:
        raise CheckpointError(f"{pipe}: no vae/ folder, but {path} decodes {channels}-channel latents, which need the "
                              f"VAE (sd3_pipeline/vae/config.json + diffusion_pytorch_model.safetensors); {INCOMPLETE}, "
                              "or copy sd3_pipeline/vae/ from a complete copy")
    return _part(D.MMDiTConfig.from_dict, path, schema.check_mmdit, pixel_space)


def vae_config(root):
    """`sd3_pipeline/vae/config.json` -> decoder.VAEConfig, checked; None for a pixel-space decoder (no vae/)."""

    vae = _pipeline_dir(root) / "vae"
    return _part(D.VAEConfig.from_dict, vae / "config.json", schema.check, schema.VAE) if vae.is_dir() else None


class Plan:
    """What the command lines (sample.py, chat.py, generate_batch.py) check their flags against before anything
    loads, read from a checkpoint's configs and tokenizer files, never its weights. Each part is read once, when a
    check first asks for it: the checks meet a damaged checkpoint's problems in the order they make them, and an
    understanding run never reads the decoder's configs.

    config, tokenizer, root: the AR model's checked config.json, its tokenizer and its folder;
    processor:               understanding's image preprocessing (preprocessor_config.json; None when absent);
    decoder_geometry:        (pixels per decoder token = VAE scale x patch size, pos_embed_max_size)."""

    def __init__(self, ckpt):
        self.ckpt, self._read = Path(ckpt), {}

    def _once(self, part: str, read: Callable):
        if part not in self._read:
            self._read[part] = read()
        return self._read[part]

    def _ar(self):
        def read():
            root = resolve_part(self.ckpt, "ar_model")
            return (*_ar_config(root), root)  # the tokenizer files are checked with the config
        return self._once("ar", read)

    config = property(lambda self: self._ar()[0])
    tokenizer = property(lambda self: self._ar()[1])
    root = property(lambda self: self._ar()[2])

    @property
    def processor(self):
        return self._once("processor", lambda: image_processor_config(self.root, self.config.vision))

    @property
    def decoder_geometry(self) -> tuple[int, int]:
        def read():
            tcfg, vcfg = transformer_config(self.ckpt), vae_config(self.ckpt)
            return (1 if vcfg is None else vcfg.scale) * tcfg.patch_size, tcfg.pos_embed_max_size
        return self._once("decoder", read)


def load_text_encoders(pipeline_dir, *, dtype=torch.float32, device="cpu", max_sequence_length: int = 256) -> dict:
    """The SD3 pipeline's text encoders and tokenizers: {"clip_l", "clip_g", "t5"} -> (model, tokenizer); "t5" is
    None when the pipeline has no text_encoder_3/ (SD3 then uses zeros for the T5 part)."""

    root = Path(pipeline_dir)
    out, parts = {}, []
    for name, enc, tok, cls, ccls, fields, km in (
            ("clip_l", "text_encoder", "tokenizer", TE.CLIPTextModel, TE.CLIPTextConfig, schema.CLIP, None),
            ("clip_g", "text_encoder_2", "tokenizer_2", TE.CLIPTextModel, TE.CLIPTextConfig, schema.CLIP, None),
            ("t5", "text_encoder_3", "tokenizer_3", TE.T5Encoder, TE.T5Config, schema.T5, T5_KEYMAP)):
        if not (root / enc).is_dir():
            if name == "t5":
                out[name] = None
                continue
            raise CheckpointError(f"{root}: missing {enc}/ (the decoder prompt is encoded once with it, then cached); "
                                  f"{INCOMPLETE}, or copy {root.name}/{enc}/ from a complete copy")
        parts.append((name, enc, tok, cls, _part(ccls.from_dict, root / enc / "config.json", schema.check, fields),
                      km))
    tokenizers = {}
    for name, enc, tok, *_ in parts:  # every config and tokenizer is checked before any weights are read
        try:
            tokenizers[name] = TE.Tokenizer(root / tok, max_sequence_length if name == "t5" else None)
        except ValueError as e:
            msg = str(e)
            raise CheckpointError(f"{msg if msg.startswith(str(root / tok)) else f'{root / tok}: {msg}'}; "
                                  f"{RESTORE_TOKENIZER}") from None
    for name, enc, tok, cls, cfg, km in parts:
        model = build_on_meta(lambda: cls(cfg))
        load_weights(model, weight_files(root / enc), km, dtype=dtype, device=device, where=str(root / enc))
        out[name] = (model.eval(), tokenizers[name])
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("UNIAR_CACHE", Path.home() / ".cache" / "uniar"))


# The decoder prompt's embeddings, computed once by the pipeline's text encoders and cached on disk


def prompt_cache_path(pipeline_dir, cache_dir, prompt: str = D.DECODER_PROMPT, joint_dim: int = 4096,
                      max_sequence_length: int = 256, dtype=torch.float32) -> Path:
    """Where the embeddings of `prompt` for this pipeline folder (and encoder dtype) are cached."""
    key = json.dumps([str(Path(pipeline_dir).resolve()), prompt, joint_dim, max_sequence_length, str(dtype)])
    return Path(cache_dir) / f"prompt_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def write_prompt_cache(path: Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    """Written whole in a private folder of this process, then renamed (files.atomic_save_file): an interrupted run
    never leaves half a cache file, concurrent runs never share a temporary name, and what a killed run left of this
    stem is removed by the next write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.remove_temp_files(path.parent, path.stem, path.suffix)
    tensors = {"prompt_embeds": prompt_embeds.float().cpu().contiguous(), "pooled": pooled.float().cpu().contiguous()}
    files.atomic_save_file(path, tensors)


def cached_prompt_embeds(pipeline_dir, cache_dir, prompt: str = D.DECODER_PROMPT, joint_dim: int = 4096,
                         max_sequence_length: int = 256, device="cpu",
                         dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed decoder prompt's embeddings (1, S, joint_dim), (1, pooled), computed once per (pipeline folder,
    prompt, encoder dtype) and stored as safetensors in cache_dir; later calls read the file and never load the text
    encoders. (The official pipeline encodes in its torch_dtype, bfloat16; float32 here unless dtype says so.)"""
    path = prompt_cache_path(pipeline_dir, cache_dir, prompt, joint_dim, max_sequence_length, dtype)
    if not path.is_file():
        enc = load_text_encoders(pipeline_dir, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
        write_prompt_cache(path, *TE.encode_prompt(enc, [prompt], joint_dim, max_sequence_length))
        del enc
    t = load_file(str(path))
    return t["prompt_embeds"].to(device), t["pooled"].to(device)


def load_decoder(root, *, dtype=None, device="cpu", cache_dir=None, prompt_embeds=None):
    """The decoder stage: `bsq_encoder/` (output projections only), `sd3_transformer/`, `sd3_pipeline/{vae,
    scheduler}` -> decoder.Decoder. The fixed decoder prompt is embedded once by the pipeline's text encoders and
    cached on disk (cache_dir, default $UNIAR_CACHE or ~/.cache/uniar); `prompt_embeds=(embeds, pooled)` skips that.
    """

    root = Path(root)
    tcfg = transformer_config(root)  # first: every part is there (the parts' configs before any weights)
    vision = load_vision(root, dtype=dtype, device=device, decoder_only=True)
    tdir = resolve_part(root, "sd3_transformer")
    transformer = build_on_meta(lambda: D.MMDiT(tcfg))
    load_weights(transformer, weight_files(tdir, "diffusion_pytorch_model"), dtype=dtype, device=device,
                 where=str(tdir))
    pipe = _pipeline_dir(root)
    vae = None  # no vae/: a pixel-space decoder (the project's toy checkpoints)
    vcfg = vae_config(root)
    if vcfg is not None:
        vae = build_on_meta(lambda: D.VAE(vcfg))
        load_weights(vae, weight_files(pipe / "vae", "diffusion_pytorch_model"), VAE_KEYMAP, dtype=dtype,
                     device=device, where=str(pipe / "vae"))
        vae.eval()
    sched = _part(D.SchedulerConfig.from_dict, pipe / "scheduler" / "scheduler_config.json", schema.check,
                  schema.SCHEDULER)
    if prompt_embeds is None and (pipe / PROMPT_EMBEDS_FILE).exists():
        prompt_embeds = _read_prompt_embeds(pipe / PROMPT_EMBEDS_FILE)
    if prompt_embeds is None:
        prompt_embeds = cached_prompt_embeds(pipe, cache_dir or default_cache_dir(), D.DECODER_PROMPT,
                                                tcfg.joint_attention_dim, device=device)
    pe, pooled = (t.to(device=device, dtype=dtype or t.dtype) for t in prompt_embeds)
    if tcfg.siglip_channels != vision.cfg.hidden_size * vision.cfg.levels:
        raise CheckpointError(f"{root}: parts do not fit together (transformer siglip_channels {tcfg.siglip_channels} "
                              f"!= vision hidden_size * levels {vision.cfg.hidden_size * vision.cfg.levels})")
    return D.Decoder(vision, transformer.eval(), vae, sched, pe, pooled).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Writing checkpoints in the released layout (train.py, rl.py)
# ---------------------------------------------------------------------------------------------------------------------


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def ar_config_dict(cfg) -> dict:
    """model.UniARConfig -> the root config.json of a released checkpoint (read back by `ar_config`)."""

    text = _plain(asdict(cfg.text))
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": text.pop("mrope_section"),
                            "mrope_interleaved": True}
    top = {k: v for k, v in asdict(cfg).items() if k not in ("text", "vision")}
    return {"architectures": ["UniARForConditionalGeneration"], "model_type": "uniar", **top,
            "text_config": {"model_type": "qwen3_vl_text", **text},
            "vision_config": {"model_type": "uniar_vision", **_plain(asdict(cfg.vision))}}


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def _write_weights(path: Path, module_or_state, keep: Callable[[str], bool] = lambda k: True) -> None:

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items() if keep(k)}, str(path))


def write_image_processor(root, proc) -> None:
    """pipeline.ImageProcessorConfig -> `<root>/preprocessor_config.json` (read back by `image_processor_config`)."""

    _write_json(Path(root) / P.PREPROCESSOR_CONFIG, proc.to_dict())


def _link_or_copy(src: str, dst: str) -> None:
    """A file of an unchanged part: a hard link where the file system allows (no second copy on disk; a later save
    replaces the link, never the file), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(root, *, ar=None, tokenizer_dir=None, vision=None, decoder=None, sample_defaults=None,
                    run_id: str | None = None, copy_from=None) -> Path:
    """Write the given parts in the released layout, crash-safe (files.replace_folder): the new files are written
    completely inside `root`, then switched in, so `root` never disappears and a save killed at any instant leaves
    either the previous checkpoint or the new one (the next save or load finishes an interrupted switch).

    ar: model.UniAR (root config.json + model.safetensors, preprocessor_config.json from its image_processor when
    it has one) with its tokenizer files copied from tokenizer_dir;
    vision: bsq.VisionModel for bsq_encoder/ (the decoder's copy of the tokenizer); decoder: decoder.Decoder
    (sd3_transformer/, sd3_pipeline/scheduler/, sd3_pipeline/vae/ when it has a VAE, and its prompt embeddings in
    sd3_pipeline/prompt_embeds.safetensors); sample_defaults: uniar_sample.json for sample.py; run_id: the training
    run writing it (files.RUN_MARK), which may later replace it without --overwrite; copy_from: a checkpoint whose
    bsq_encoder/, sd3_transformer/ and sd3_pipeline/ are carried over unchanged where `vision` / `decoder` are not
    given (a fine-tune of the AR model keeps its tokenizer copy and its decoder).
    """
    def write(tmp: Path) -> None:
        if ar is not None:
            _write_json(tmp / "config.json", ar_config_dict(ar.cfg))
            _write_weights(tmp / "model.safetensors", ar)
            if ar.image_processor is not None:
                write_image_processor(tmp, ar.image_processor)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                         "generation_config.json"):
                if tokenizer_dir is not None and (Path(tokenizer_dir) / name).exists():
                    shutil.copy(Path(tokenizer_dir) / name, tmp / name)
        if vision is not None:
            _write_json(tmp / "bsq_encoder" / "config.json",
                        {"architectures": ["UniARVisionModel"], "model_type": "uniar_vision", "use_bsq": True,
                         **_plain(asdict(vision.cfg))})
            _write_weights(tmp / "bsq_encoder" / "model.safetensors", vision)
        if decoder is not None:
            _write_json(tmp / "sd3_transformer" / "config.json",
                        {"_class_name": "SD3Transformer2DModelWithSigLIP", **_plain(asdict(decoder.transformer.cfg))})
            _write_weights(tmp / "sd3_transformer" / "diffusion_pytorch_model.safetensors", decoder.transformer)
            _write_json(tmp / "sd3_pipeline" / "scheduler" / "scheduler_config.json",
                        {"_class_name": "FlowMatchEulerDiscreteScheduler", **_plain(asdict(decoder.scheduler))})
            if decoder.vae is not None:
                _write_json(tmp / "sd3_pipeline" / "vae" / "config.json",
                            {"_class_name": "AutoencoderKL", **_plain(asdict(decoder.vae.cfg))})
                _write_weights(tmp / "sd3_pipeline" / "vae" / "diffusion_pytorch_model.safetensors", decoder.vae)
            pe, pooled = decoder.text(1)
            _write_weights(tmp / "sd3_pipeline" / PROMPT_EMBEDS_FILE, {"prompt_embeds": pe, "pooled": pooled})
        for part in ("bsq_encoder",) * (vision is None) + ("sd3_transformer", "sd3_pipeline") * (decoder is None):
            if copy_from is not None and (Path(copy_from) / part).is_dir():
                shutil.copytree(Path(copy_from) / part, tmp / part, copy_function=_link_or_copy)
        if sample_defaults is not None:
            _write_json(tmp / "uniar_sample.json", sample_defaults)
        if run_id is not None:
            _write_json(tmp / files.RUN_MARK, {"run_id": run_id})

    return files.replace_folder(Path(root), write)


def default_dtype(device) -> torch.dtype:
    """The dtype a device runs the model in by default: bf16 on CUDA (the released weights' dtype, half the memory of
    fp32); fp32 on the CPU and on Apple's MPS. On MPS, bf16 needs macOS 14 or later and fp16 has a narrower range than
    the bf16 the model was trained in (activations can overflow), while fp32 works on every MPS system and matches
    the CPU path (`sample.py --dtype bfloat16` halves the memory there on macOS 14+)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
