"""svare_core.safety CLIP backend on a tiny random CLIP saved to tmp_path (offline)."""

from __future__ import annotations

import json
import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from svare_core.safety import DetectorUnavailable, get_detector  # noqa: E402
from svare_core.safety.clip import CLIPDetector  # noqa: E402


def make_tiny_clip(path, with_preprocessor: bool = True, seed: int = 0):
    """Random 2-layer CLIP + a character-level CLIP tokenizer, saved in HF format."""
    chars = [c for c in string.printable if c.isprintable() and not c.isspace()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:  # byte-level BPE without merges: every char, inside and at the end of a word
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if with_preprocessor:
        proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        proc_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clip")
    model, tok = make_tiny_clip(path)
    return path, model, tok


def _images(n=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_clip_shapes_and_probabilities(tiny_clip):
    path, _, _ = tiny_clip
    det = get_detector("clip", model_path=str(path), device="cpu")
    imgs = torch.from_numpy(_images()).float() / 255
    d = det.detect(imgs, concept="Van Gogh")
    assert d.detector == "clip" and d.concept == "Van Gogh"
    assert d.scores.shape == (3,) and np.all((d.scores >= 0) & (d.scores <= 1))
    assert len(d.labels) == 3 and len(d.details) == 3
    probs = d.details[0]["prompt_probs"]
    assert list(probs) == [
        "a photo of Van Gogh", "a painting in the style of Van Gogh", "a photo", "an image", "a picture of something",
    ]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    # score = probability mass of the concept prompts
    assert d.scores[0] == pytest.approx(probs["a photo of Van Gogh"] + probs["a painting in the style of Van Gogh"], abs=1e-6)
    for s, labels in zip(d.scores, d.labels):
        assert labels == (["Van Gogh"] if s >= 0.5 else [])
    # PIL input (different sizes) works and agrees with the tensor path
    pils = [Image.fromarray(a) for a in _images()]
    np.testing.assert_allclose(det.detect(pils, "Van Gogh").scores, d.scores, atol=1e-5)
    assert get_detector("clip", model_path=str(path), device="cpu") is det  # cached
    json.dumps(d.to_dict())


def test_clip_score_matches_direct_model_computation(tiny_clip):
    path, model, tok = tiny_clip
    det = CLIPDetector(model_path=str(path), device="cpu")
    imgs = _images(2, 32, seed=1)  # already 32 px: the processor only rescales/normalises
    d = det.detect(imgs, "a cat")
    prompts = ["a photo of a cat", "a painting in the style of a cat", "a photo", "an image", "a picture of something"]
    proc = det._processor(images=[Image.fromarray(a) for a in imgs], return_tensors="pt")
    text = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=proc["pixel_values"])
    p = out.logits_per_image.softmax(-1).numpy()
    np.testing.assert_allclose(d.scores, p[:, :2].sum(1), atol=1e-5)


def test_clip_concept_equal_to_neutral_gives_chance(tiny_clip):
    path, _, _ = tiny_clip
    det = CLIPDetector(model_path=str(path), templates=["{concept}"], neutral_prompts=["a photo"], device="cpu")
    d = det.detect(_images(2), "a photo")  # concept prompt == neutral prompt -> 1/2 exactly
    np.testing.assert_allclose(d.scores, 0.5, atol=1e-6)
    det3 = CLIPDetector(model_path=str(path), templates=["{concept}", "{concept}"], neutral_prompts=["x"], device="cpu")
    d3 = det3.detect(_images(2), "x")  # 2 of 3 identical prompts are "concept"
    np.testing.assert_allclose(d3.scores, 2 / 3, atol=1e-6)
    with pytest.raises(ValueError, match="concept"):
        det.detect(_images(1), None)
    with pytest.raises(ValueError):
        CLIPDetector(model_path=str(path), templates=["no placeholder"])


def test_clip_without_preprocessor_config_and_env_var(tmp_path, monkeypatch):
    make_tiny_clip(tmp_path, with_preprocessor=False, seed=1)
    monkeypatch.setenv("SVARE_CLIP_MODEL", str(tmp_path))
    det = CLIPDetector(device="cpu")
    d = det.detect(_images(2, 40), "dog")
    assert d.scores.shape == (2,) and np.all((d.scores >= 0) & (d.scores <= 1))


def test_clip_missing_folder_raises_helpful_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SVARE_CLIP_MODEL", raising=False)
    with pytest.raises(DetectorUnavailable, match="SVARE_CLIP_MODEL") as err:
        get_detector("clip", cache=False)
    assert "config.json" in str(err.value) and "model.safetensors" in str(err.value)

    missing = tmp_path / "does-not-exist"
    with pytest.raises(DetectorUnavailable, match="does not exist") as err:
        get_detector("clip", model_path=str(missing), cache=False)
    assert "tokenizer.json" in str(err.value) and str(missing) in str(err.value)

    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(DetectorUnavailable, match="lacks") as err:
        get_detector("clip", model_path=str(half), cache=False)
    assert "model.safetensors" in str(err.value) and "tokenizer" in str(err.value)
