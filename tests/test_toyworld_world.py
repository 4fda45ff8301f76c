"""Tests for the procedural toy world (svare_core.toyworld.world)."""
import re

import numpy as np
import pytest

from svare_core.toyworld import world as W


def test_constants():
    assert W.SHAPES == ("circle", "square", "triangle", "star", "heart")
    assert W.STYLES == ("solid", "striped", "dotted", "outlined")
    assert {"red", "green", "blue", "yellow", "purple", "orange", "white"} <= set(W.COLOURS)
    assert set(W.BACKGROUNDS) == {"black", "gray"}
    assert W.ATTRIBUTES == ("shape", "colour", "style", "background")
    assert W.VALUES["colour"] == tuple(W.COLOURS)
    all_values = [v for a in W.ATTRIBUTES for v in W.VALUES[a]]
    assert len(all_values) == len(set(all_values))  # a value names its attribute uniquely


def test_determinism_and_chunking():
    a = W.make_dataset(40, seed=3)
    b = W.make_dataset(40, seed=3)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    c1 = W.make_dataset(15, seed=3)
    c2 = W.make_dataset(25, seed=3, offset=15)
    assert np.array_equal(np.concatenate([c1[0], c2[0]]), a[0])
    assert c1[1] + c2[1] == a[1]
    for k in W.ATTRIBUTES:
        assert np.array_equal(np.concatenate([c1[2][k], c2[2][k]]), a[2][k])
    other = W.make_dataset(40, seed=4)
    assert not np.array_equal(other[0], a[0])
    assert a[0].dtype == np.uint8 and a[0].shape == (40, 64, 64, 3)
    assert all(a[2][k].dtype == np.int64 for k in W.ATTRIBUTES)


def test_render_deterministic_and_style_colours():
    s = W.Scene("star", "red", "striped", "gray", 32.0, 32.0, 20.0)
    img = W.render(s)
    assert np.array_equal(img, W.render(s))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == W.BACKGROUNDS["gray"]
    pix = {tuple(p) for p in img.reshape(-1, 3)}
    assert W.COLOURS["red"] in pix  # the pure colour is present (stripes are >= 3 px)
    out = W.render(W.Scene("circle", "blue", "outlined", "black", 32.0, 32.0, 20.0))
    assert tuple(out[32, 32]) == (0, 0, 0)  # outlined: interior shows the background
    assert tuple(out[32, 32 - 19]) == W.COLOURS["blue"]


def test_shapes_inside_image():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = W.sample_scene(rng)
        assert 12 <= s.radius <= 22
        m = W.mask(s, size=256)
        assert m.sum() > 0
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_every_value_appears_and_held_out():
    scenes = W.make_scenes(1500, seed=0)
    for a in W.ATTRIBUTES:
        assert {s.label(a) for s in scenes} == set(W.VALUES[a])
    assert not any(W.is_held_out(s) for s in scenes)
    with_held = W.make_scenes(1500, seed=0, include_held_out=True)
    assert any(W.is_held_out(s) for s in with_held)
    _, _, labels = W.make_dataset(300, seed=1)
    combos = {(W.SHAPES[a], W.VALUES["colour"][b], W.STYLES[c])
              for a, b, c in zip(labels["shape"], labels["colour"], labels["style"])}
    assert not combos & W.HELD_OUT_COMBOS


def test_held_out_covers_all_values():
    assert 10 <= len(W.HELD_OUT_COMBOS) <= 16
    for i, a in enumerate(("shape", "colour", "style")):
        assert {c[i] for c in W.HELD_OUT_COMBOS} == set(W.VALUES[a])


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", text.lower()))


def test_captions_truthful_and_mention_rates():
    scenes = W.make_scenes(1200, seed=5, include_held_out=True)
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(W.ATTRIBUTES, 0)
    for s in scenes:
        cap = W.caption(s, rng)
        words = _words(cap)
        for a in W.ATTRIBUTES:
            named = words & set(W.VALUES[a])
            if a == "style":
                named |= {v for v, phrase in W.STYLE_SUFFIX.items() if phrase in cap}
            assert named <= {s.label(a)}, (cap, s)
            counts[a] += bool(named)
        # English articles before vowels
        assert not re.search(r"\ba [aeiou]", cap), cap
        assert not re.search(r"\ban [^aeiou\s]", cap), cap
    rates = {a: counts[a] / len(scenes) for a in W.ATTRIBUTES}
    for a, p in W.MENTION_PROB.items():
        assert abs(rates[a] - p) < 0.06, rates


def test_full_caption():
    assert W.full_caption(colour="red", shape="star") == "a red star"
    assert W.full_caption(style="striped") == "a striped shape"
    assert W.full_caption() == "a shape"
    assert W.full_caption(colour="orange", shape="heart") == "an orange heart"
    assert W.full_caption(style="outlined", colour="green", shape="triangle") == "an outlined green triangle"
    assert W.full_caption(shape="square", background="black") == "a square on a black background"


def test_synonyms_never_in_training_captions():
    for a in ("shape", "colour", "style"):
        for v in W.VALUES[a]:
            assert 2 <= len(W.SYNONYMS[v]) <= 3
    _, caps, _ = W.make_dataset(800, seed=2, include_held_out=True)
    text = " | ".join(caps)
    for syns in W.SYNONYMS.values():
        for s in syns:
            assert not re.search(rf"\b{re.escape(s)}\b", text), s
    p = W.paraphrase_caption(colour="red", shape="star")
    assert p in ("a crimson star", "a scarlet star")
    p = W.paraphrase_caption(colour="red", shape="star", attribute="shape", synonym_index=0)
    assert p == "a red " + W.SYNONYMS["star"][0]
    assert W.paraphrase_caption(style="outlined").startswith("a ")  # "a hollow shape"
    with pytest.raises(ValueError):
        W.paraphrase_caption()
