"""Tests for the analytic toy-world oracle (svare_core.toyworld.oracle)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from svare_core.toyworld import world as W
from svare_core.toyworld.oracle import NONE, Oracle, attribute_of


@pytest.fixture(scope="module")
def data():
    scenes = W.make_scenes(600, seed=11, include_held_out=True)
    return scenes, np.stack([W.render(s) for s in scenes])


@pytest.fixture(scope="module")
def oracle():
    return Oracle()


def degrade(images: np.ndarray, seed: int = 0, sigma: float = 1.0, noise: float = 6.0,
            shift: float = 10.0) -> np.ndarray:
    """What a small generator does: Gaussian blur, pixel noise and a per-image colour shift."""
    rng = np.random.default_rng(seed)
    out = []
    for x in images:
        y = np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(sigma)), np.float32)
        y = y + rng.uniform(-shift, shift, 3) + rng.normal(0, noise, y.shape)
        out.append(np.clip(np.rint(y), 0, 255).astype(np.uint8))
    return np.stack(out)


def accuracies(oracle, images, scenes):
    res = oracle.read(images)
    return {a: np.mean([r[a] == s.label(a) for r, s in zip(res, scenes)]) for a in W.ATTRIBUTES}


def test_clean_accuracy(oracle, data):
    scenes, images = data
    acc = accuracies(oracle, images, scenes)
    assert all(v >= 0.98 for v in acc.values()), acc


def test_degraded_accuracy(oracle, data):
    scenes, images = data
    acc = accuracies(oracle, degrade(images), scenes)
    assert all(v >= 0.90 for v in acc.values()), acc


def test_scores_and_shows(oracle, data):
    scenes, images = data
    imgs, sc = images[:40], scenes[:40]
    scores = oracle.scores(imgs)
    for a in W.ATTRIBUTES:
        assert scores[a].shape == (40, len(W.VALUES[a]))
        assert np.all(scores[a] >= 0) and np.all(scores[a] <= 1)
        np.testing.assert_allclose(scores[a].sum(1), 1.0, atol=1e-6)
        assert np.mean(scores[a].argmax(1) == [W.VALUES[a].index(s.label(a)) for s in sc]) >= 0.95
    red = oracle.shows(imgs, "red")
    assert red.dtype == bool and red.shape == (40,)
    assert np.array_equal(red, [s.colour == "red" for s in sc])
    assert np.array_equal(oracle.shows(imgs, "gray"), [s.background == "gray" for s in sc])
    values, scores2 = oracle.predict(imgs)
    assert values == oracle.read(imgs)
    assert attribute_of("striped") == "style" and attribute_of("heart") == "shape"
    with pytest.raises(KeyError):
        attribute_of("banana")


def test_empty_image(oracle):
    blank = np.zeros((2, 64, 64, 3), np.uint8)
    blank[1] = W.BACKGROUNDS["gray"]
    blank[1] += np.random.default_rng(0).integers(0, 6, (64, 64, 3), dtype=np.uint8)
    res = oracle.read(blank)
    assert [r["background"] for r in res] == ["black", "gray"]
    for r in res:
        assert r["shape"] == r["colour"] == r["style"] == NONE
    scores = oracle.scores(blank)
    for a in W.ATTRIBUTES:
        np.testing.assert_allclose(scores[a].sum(1), 1.0, atol=1e-6)
    assert not oracle.shows(blank, "circle").any()


def test_float_and_comfy_layout(oracle, data):
    scenes, images = data
    imgs = images[:20]
    ref = oracle.read(imgs)
    t = torch.from_numpy(imgs).float() / 255.0  # ComfyUI IMAGE: [N,H,W,3] float 0..1
    assert oracle.read(t) == ref
    assert oracle.read(t.permute(0, 3, 1, 2)) == ref  # channels-first also accepted
    assert oracle.read(imgs[0]) == ref[:1]  # a single [H,W,3] image
    big = torch.nn.functional.interpolate(t.permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
    assert big.shape == (20, 128, 128, 3)
    res = oracle.read(big)  # resized back to 64
    agree = np.mean([r[a] == q[a] for r, q in zip(res, ref) for a in W.ATTRIBUTES])
    assert agree >= 0.95
