"""Reference paths that the product does not run: the official generation loop (the visual-decoder stack re-run over
the whole sequence at every step) and a sampler wrapper that records each step's bit logits. Tests and bench.py
compare the product's cached paths against them."""
import torch

import model as M


class Recorder:
    """Wraps a sampler: records the bit logits (B_all, O) of every step, before guidance."""

    def __init__(self, sampler):
        self.sampler, self.steps = sampler, []
        self.cfg_scale = getattr(sampler, "cfg_scale", 1.0)

    def __call__(self, logits, step):
        self.steps.append(logits.flatten(1))
        return self.sampler(logits, step)

    @property
    def step_logits(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1)  # (B_all, N, O)


def sampler(cfg_scale=1.0, temperature=1.0, generator=None, record=True):
    s = M.MultinomialSampler(cfg_scale, temperature, generator)
    return Recorder(s) if record else s


@torch.no_grad()
def generate_image_recompute(model, prefix_ids, attention_mask, ar_height, ar_width, sampler, pixel_values=None,
                             image_grid_thw=None) -> torch.Tensor:
    """The official loop: the backbone keeps its KV cache, the visual-decoder stack re-reads every state of the
    sequence at every step. -> bits of every row (B_all, N, L, U, d)."""
    B_all, Lp = prefix_ids.shape
    gh, gw = ar_height // model.cfg.downsample, ar_width // model.cfg.downsample
    N, lm = gh * gw, model.language_model
    ids_all, mask_all, grids = model.append_image_placeholders(prefix_ids, attention_mask, N, gh, gw, image_grid_thw)
    pos = M.get_rope_index(ids_all, grids, mask_all, model.cfg)
    valid = mask_all.bool()
    cache = M.KVCache.for_layers(len(lm.layers), model.cfg.text, B_all, Lp + N)
    seq = M.prefill(model, prefix_ids, attention_mask, pos[:, :, :Lp], cache, pixel_values, image_grid_thw)
    out = []
    for i in range(N):
        T = seq.shape[1]
        cos, sin = lm.rope(pos[:, :, :T], seq.dtype)
        h = M.run_stack(model.visual_decoder, seq, cos, sin, valid[:, :T])
        bits = sampler(model.vistok_logits(h[:, -1]), i)
        out.append(bits)
        if i < N - 1:
            seq = torch.cat([seq, M.read_image_token(model, cache, bits, pos[:, :, Lp + i:Lp + i + 1])], dim=1)
    return torch.stack(out, dim=1)
