"""Switti through load_pipeline: a tiny transformer whose text width fits the tiny CLIP towers of
tests/fixtures/switti_text_tiny, the tiny VQ-VAE, and both towers named as text encoders; the
pipeline samples an image from a prompt string end to end (text -> transformer -> VQ-VAE)."""
from __future__ import annotations

import pytest
import torch

from svare_core.loader import load_pipeline
from svare_core.models import ModelLoadError
from svare_core.models.text_clip import SwittiText
from svare_core.sampling import generate
from svare_core.sampling_vq import VQSamplerSettings
from tests.test_switti_parity import REF, _weights_module, goldens, ref_config, released_file  # noqa: F401

TEXT = REF.parent / "switti_text_tiny"
CLIP_L, CLIP_G = TEXT / "clip_l", TEXT / "clip_g"
TEXT_WIDTH, POOLED_WIDTH = 64 + 96, 96        # the tiny towers: CLIP-L 64 wide, bigG 96


def tiny_switti_shapes(ref_config: dict) -> dict[str, tuple[int, ...]]:  # noqa: F811
    """The parity model's parameters with the text widths of the tiny CLIP towers."""
    out = {}
    for key, shape in ref_config["transformer_parameters"].items():
        shape = tuple(shape)
        if key.endswith("cross_attn.to_kv.weight"):
            shape = (shape[0], TEXT_WIDTH)
        elif key.endswith("attention_y_norm.weight"):
            shape = (TEXT_WIDTH,)
        elif key == "text_pooler.weight":
            shape = (shape[0], POOLED_WIDTH)
        out[key] = shape
    return out


@pytest.fixture(scope="module")
def pipeline_files(tmp_path_factory, goldens, ref_config) -> dict:  # noqa: F811
    d = tmp_path_factory.mktemp("switti_pipeline")
    out = {"model": released_file(d / "switti_text160.safetensors", tiny_switti_shapes(ref_config),
                                  {"lvl_1L": goldens["lvl_1L"], "attn_bias_for_masking": goldens["mask_default"]})}
    rows = ref_config["vae_buffers"]["quantize.ema_vocab_hit_SV"]
    out["vae"] = released_file(d / "vqvae.safetensors", ref_config["vae_parameters"],
                               {"quantize.ema_vocab_hit_SV": torch.zeros(rows)})
    out["text"] = (CLIP_L, CLIP_G)
    return out


@pytest.fixture(scope="module")
def switti_pipe(pipeline_files):
    return load_pipeline(pipeline_files["model"], vae=pipeline_files["vae"], text_encoder=pipeline_files["text"],
                         text_dtype="fp32")


def test_text_encoder_output_feeds_the_transformer(switti_pipe):
    """One order everywhere: SwittiText.encode gives (features, mask, pooled), what encode_text reads."""
    text = switti_pipe.text_encoder
    assert isinstance(text, SwittiText) and switti_pipe.family == "switti"
    out = text.encode(["a red cube"])
    features, mask, pooled = out                    # positional unpacking, as pipeline.condition does
    assert features.shape == (1, 77, TEXT_WIDTH) and mask.dtype == torch.bool and pooled.shape == (1, POOLED_WIDTH)
    assert torch.equal(out.features, features) and torch.equal(out.mask, mask) and torch.equal(out.pooled, pooled)
    cond = switti_pipe.condition(["a red cube"])
    assert torch.equal(cond.mask, mask)
    with torch.no_grad():
        torch.testing.assert_close(cond.pooled, switti_pipe.transformer.text_pooler(pooled), rtol=0, atol=0)


def test_samples_an_image_from_a_prompt(switti_pipe):
    s = VQSamplerSettings(cfg=3.0, top_k=10, top_p=0.9, cfg_stop=3, smooth=False)
    a = generate(switti_pipe, "a red cube on a table", seed=5, settings=s)
    b = generate(switti_pipe, "a red cube on a table", seed=5, settings=s)
    c = generate(switti_pipe, "a blue sphere", seed=5, settings=s)
    side = switti_pipe.transformer.cfg.scales[-1][0] * switti_pipe.vae.cfg.stride
    assert a.images.shape == (1, side, side, 3) and bool(torch.isfinite(a.images).all())
    assert float(a.images.std()) > 0                 # decoded, not a blank image
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))      # seeded
    # the prompt reaches the tokens: another prompt draws other tokens (30 tokens of 64 codes)
    assert not all(torch.equal(x, y) for x, y in zip(a.indices, c.indices))


def test_text_encoders_named_wrongly_are_one_line(pipeline_files, tmp_path):
    f = pipeline_files
    with pytest.raises(ModelLoadError, match=r"reads 2 text encoders: give text_encoder=\(clip_l, clip_g\)"):
        load_pipeline(f["model"], vae=f["vae"])
    with pytest.raises(ModelLoadError, match="clip_g: .* does not exist"):
        load_pipeline(f["model"], vae=f["vae"], text_encoder=(CLIP_L, tmp_path / "missing"))
    # the towers swapped: bigG's features and pooled vector do not have the widths the transformer reads
    with pytest.raises(ModelLoadError, match="pooled vector 64 wide but the transformer reads 96"):
        load_pipeline(f["model"], vae=f["vae"], text_encoder=(CLIP_G, CLIP_L), text_dtype="fp32")
