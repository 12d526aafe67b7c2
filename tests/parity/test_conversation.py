"""Shared context across turns (pipeline.Conversation / model.Context) on the golden checkpoint: every state the
conversation keeps equals one forward over the whole conversation from scratch, a drawing is the single-turn
generation when it opens the conversation, and a drawn image reads exactly like the same bits given as a picture.
Sizes and settings come from the fixture folder."""
import pytest
import torch

import load_hf
import model as M
import pipeline as P
from bench import Recorder
from conftest import assert_close_rel, own_copy

RTOL = 1e-5


@pytest.fixture(scope="module")
def ar(golden_ckpt):
    net, tok = load_hf.load_ar(golden_ckpt)
    return net.eval(), tok


def scratch(net, ctx: M.Context):
    """One forward over every token the context holds, its images given as their bits: states, positions."""
    ids = torch.tensor([ctx.ids])
    bits = torch.cat([b for b, _ in ctx.images]) if ctx.images else None
    grids = torch.tensor([g for _, g in ctx.images]) if ctx.images else None
    with torch.no_grad():
        return net.context_states(ids, torch.ones_like(ids), bits, grids)


def assert_context_is_scratch(net, ctx, what):
    h, pos = scratch(net, ctx)
    assert torch.equal(pos[:, 0], ctx.pos), f"{what}: positions"
    assert_close_rel(ctx.states, h, RTOL, f"{what}: states")
    assert_close_rel(net.text_logits_of(ctx.states[:, -1]), net.text_logits_of(h[:, -1]), RTOL, f"{what}: logits")


def test_first_drawing_is_the_single_turn_generation(golden, ar):
    """A conversation that opens with a drawing draws the official e2e bits (seeded as the fixture), the bits
    generate_bits draws."""
    net, tok = ar
    sc = golden.scenario("e2e")
    seed = golden.seed("e2e.indices", "e2e")
    conv = P.Conversation(net, tok)
    bits = conv.draw(sc["prompt"], ar_height=sc["ar_height"], ar_width=sc["ar_width"], cfg_scale=sc["cfg"],
                     temperature=sc["temperature"], seed=seed)
    assert torch.equal(M.bsq.bits_to_indexes(bits), golden["e2e.indices"])
    assert torch.equal(bits, P.generate_bits(net, tok, sc["prompt"], ar_height=sc["ar_height"],
                                             ar_width=sc["ar_width"], cfg_scale=sc["cfg"],
                                             temperature=sc["temperature"], seed=seed))


def test_every_turn_equals_one_forward_from_scratch(golden, ar):
    """Draw, ask, edit (an instruction about the drawing), ask with a picture, draw without guidance: after every
    turn the cached states, positions and next-token logits equal one forward over the whole conversation; inside
    each drawing, every step's bit logits (cond row) equal the teacher-forced logits of the drawn bits read from
    scratch."""
    net, tok = ar
    sc = golden.scenario("e2e")
    H, W = sc["ar_height"], sc["ar_width"]
    img = golden["vision.image_uint8"].numpy()
    conv = P.Conversation(net, tok)

    def drawing(text, cfg_scale, seed, image=None):
        rec = Recorder(M.MultinomialSampler(cfg_scale, 1.0, torch.Generator().manual_seed(seed)))
        start = conv.ctx.length
        bits = conv.draw(text, image, ar_height=H, ar_width=W, sampler=rec)
        N = bits.shape[1]
        ids = torch.tensor([conv.ctx.ids])
        first = conv.ctx.ids.index(net.cfg.image_token_id, start + 1 if image is None else
                                   conv.ctx.ids.index(net.cfg.vision_end_token_id, start) + 1)
        h, pos = scratch(net, conv.ctx)
        with torch.no_grad():
            tf = net.bit_logits_of(h, pos, torch.ones_like(ids), (0, slice(first - 1, first - 1 + N)))
        assert_close_rel(rec.step_logits[0].view(tf.shape), tf, RTOL, f"{text}: step logits")
        assert_context_is_scratch(net, conv.ctx, text)

    drawing(sc["prompt"], sc["cfg"], 1)
    conv.ask("what is in the image?", max_new_tokens=5)
    assert_context_is_scratch(net, conv.ctx, "question")
    drawing("make it blue", sc["cfg"], 2)
    conv.ask("and this one?", img, max_new_tokens=4)
    assert_context_is_scratch(net, conv.ctx, "question with a picture")
    drawing("edit the picture", sc["cfg"], 3, image=img)
    drawing("once more", 1.0, 4)
    assert len(conv.ctx.images) == 6  # four drawings and two pictures, all read as bits


def test_a_drawn_image_reads_like_the_same_bits_given_as_a_picture(golden, ar):
    """Force a drawing to the bits of a real picture: the context it leaves equals the one the model builds when the
    same picture comes in as pixels at the same place (the understanding path: tower -> bits -> re-embedding)."""
    net, tok = ar
    sc = golden.scenario("e2e")
    H, W = sc["ar_height"], sc["ar_width"]
    img = golden["vision.image_uint8"].numpy()
    conv = P.Conversation(net, tok)
    bits, grid, n = conv.picture(img, (H, W))
    N = bits.shape[0]
    assert N == (H // net.cfg.downsample) * (W // net.cfg.downsample)

    def forced(logits, step):
        return bits[step].expand(logits.shape[0], *bits.shape[1:])

    drawn = conv.draw("a picture", ar_height=H, ar_width=W, cfg_scale=sc["cfg"], sampler=forced)
    assert torch.equal(drawn[0], bits)
    conv.ask("what is it?", max_new_tokens=3)
    v = net.cfg.vision
    pv, g = P.preprocess_image(img, size=(H, W), patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                   temporal_patch_size=v.temporal_patch_size)
    ids = torch.tensor([conv.ctx.ids])
    with torch.no_grad():
        want = net.text_logits(ids, torch.ones_like(ids), pv, g)  # the picture read from its pixels
    assert_close_rel(net.text_logits_of(conv.ctx.states), want, RTOL, "pixels vs drawn bits")


def test_a_turn_beyond_the_position_budget_is_refused(ar):
    """A turn whose tokens would take positions beyond max_position_embeddings is a ValueError naming the budget,
    before anything is read (pipeline.read_context; model.Context.read only asserts it)."""
    net, tok = ar
    net = own_copy(net)
    ids = tok.encode(P.join(P.render_user_turn("hello"), P.MODEL_TURN))
    net.cfg.text.max_position_embeddings = len(ids) - 1
    conv = P.Conversation(net, tok)
    with pytest.raises(ValueError, match=f"the conversation needs position {len(ids)}, beyond "
                                         f"max_position_embeddings={len(ids) - 1}"):
        conv.ask("hello", max_new_tokens=1)
    assert conv.ctx.length == 0
    with pytest.raises(AssertionError, match="position budget"):
        conv.ctx.read(ids)
