"""Loading Switti and its VQ-VAE like Infinity: streamed through the registry, in fp32 or bf16, with the
memory check and one clear line for a wrong pairing; the family's sampler defaults; svare files
round-trip the variant."""
from __future__ import annotations

import math

import pytest
import torch

from svare_core.loader import load_pipeline, load_switti
from svare_core.models import ModelLoadError, load_transformer, load_vae
from svare_core.models import registry
from svare_core.models.format import save_model
from svare_core.models.registry import inspect_file
from svare_core.sampling_vq import VQSamplerSettings
from svare_core.settings import get_family, resolve_sampler
from tests.test_switti_parity import GoldenText, close, condition, files, goldens, ref_config, scales  # noqa: F401


def test_load_switti_parts(files, goldens, scales):  # noqa: F811
    for variant in ("default", "ar"):
        transformer, vae = load_switti(files[variant], files["vae"])
        assert transformer.cfg.causal is (variant == "ar")
        assert not any("attn_bias" in k for k in transformer.state_dict())      # the mask is not kept
        assert vae.quantize.embedding.weight.dtype == torch.float32
        with torch.no_grad():
            close(transformer(condition(transformer, goldens), goldens["tf_x"], scales), goldens[f"tf_logits_{variant}"])


def test_load_in_bf16(files, goldens, scales):  # noqa: F811
    transformer, vae = load_switti(files["default"], files["vae"], dtype="bf16")
    assert transformer.head.weight.dtype == torch.bfloat16 and vae.dtype == torch.float32   # VAE on the CPU stays fp32
    assert transformer.crop_embed.weight.dtype == torch.float32       # the Fourier frequencies stay fp32
    with torch.no_grad():
        logits = transformer(condition(transformer, goldens), goldens["tf_x"], scales)
    ref = goldens["tf_logits_default"]
    assert logits.dtype == torch.float32
    # bf16 weights move the logits by about 1% here; bf16 crop frequencies moved them by 27%
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()


def test_wrong_pairings_are_one_line(files):  # noqa: F811
    with pytest.raises(ModelLoadError, match="is a Switti transformer .*, not an Infinity BSQ VAE or a VAR multi-scale VQVAE"):
        load_switti(files["default"], files["ar"])
    with pytest.raises(ModelLoadError, match="holds no VAE: .*Switti: VQVAE-Switti"):
        load_pipeline(files["default"])
    with pytest.raises(ModelLoadError, match=r"reads 2 text encoders: give text_encoder=\(clip_l, clip_g\)"):
        load_pipeline(files["default"], vae=files["vae"])


def test_memory_budget_refuses_before_allocating(files, monkeypatch):  # noqa: F811
    monkeypatch.setattr(registry, "_free_bytes", lambda device: 1000)
    with pytest.raises(ModelLoadError, match=r"needs 0\.\d GB of RAM but only 0\.0 GB are free"):
        load_transformer(files["default"])


def test_svare_file_keeps_the_variant(files, tmp_path):  # noqa: F811
    transformer, vae = load_switti(files["ar"], files["vae"])
    path = save_model(tmp_path / "switti_ar.safetensors", transformer=transformer, vae=vae)
    again, vae2 = load_transformer(path), load_vae(path)
    assert again.cfg == transformer.cfg and again.cfg.causal
    assert torch.equal(again.head.weight, transformer.head.weight)
    assert torch.equal(vae2.quantize.embedding.weight, vae.quantize.embedding.weight)


def test_family_defaults():
    s = resolve_sampler("switti")
    assert isinstance(s, VQSamplerSettings) and get_family("switti").name == "switti"
    assert (s.cfg, s.top_k, s.top_p, s.cfg_start, s.cfg_stop, s.final_tau, s.smooth, s.smooth_start) == (
        6.0, 400, 0.95, 0, 11, 0.1, True, 2)
    assert resolve_sampler("switti", cfg=4.0, top_k=None).cfg == 4.0


def test_inspect_counts_parameters_not_the_mask(files, ref_config):  # noqa: F811
    info = inspect_file(files["ar"])
    assert info.family == "switti" and info.supported and info.config["causal"] is True
    assert info.num_params == sum(math.prod(s) for s in ref_config["transformer_parameters"].values())
