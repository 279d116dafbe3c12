"""ShapesWorld renderer and caption grammar."""

from __future__ import annotations

import numpy as np

from studio.toyworld import world


def test_render_is_deterministic_and_antialiased():
    scenes = world.sample_scenes(8, 3)
    a = [world.render(s) for s in scenes]
    b = [world.render(s) for s in world.sample_scenes(8, 3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    img = a[0]
    bg = np.array(world.BACKGROUNDS[scenes[0].background])
    col = np.array(world.COLORS[scenes[0].objects[0].color])
    # edge pixels are blends of object and background colour (anti-aliasing), not only the two colours
    d_bg = np.abs(img.astype(int) - bg).sum(-1)
    d_col = np.abs(img.astype(int) - col).sum(-1)
    assert ((d_bg > 20) & (d_col > 20)).sum() > 5


def test_captions_parse_back_to_their_scenes():
    for s in world.sample_scenes(300, 11, drop_prob=0.3):
        p = world.parse_caption(world.caption(s))
        assert p is not None, world.caption(s)
        assert len(p.objects) == len(s.objects)
        assert p.mention_background == s.mention_background
        if s.mention_background:
            assert p.background == s.background
        for i, (o, q) in enumerate(zip(s.objects, p.objects)):
            assert (q.shape, q.color, q.texture) == (o.shape, o.color, o.texture)
            assert p.mention_size[i] == s.mention_size[i] and p.mention_position[i] == s.mention_position[i]
            if s.mention_size[i]:
                assert q.size == o.size
            if s.mention_position[i]:
                assert q.position == o.position


def test_text_outside_the_grammar_is_not_a_scene():
    for text in ["a photo of a cat", "", "a red", "a blue square on the moon", "a red circle and a blue square and a green star",
                 "a red circle on the left and a blue square on the left"]:
        assert world.parse_caption(text) is None, text


def test_held_out_concepts_never_in_base_sampling():
    seen_shapes = {o.shape for s in world.sample_scenes(2000, 1) for o in s.objects}
    seen_textures = {o.texture for s in world.sample_scenes(2000, 1) for o in s.objects}
    assert seen_shapes == set(world.SHAPES)
    assert not seen_shapes & set(world.HELD_OUT_SHAPES)
    assert seen_textures == {"plain"}
