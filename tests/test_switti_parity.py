"""Numerical parity with the reference Switti (yandex-research/switti), fp32 on CPU.

tests/fixtures/switti_tiny holds what the reference code produced for a tiny random Switti
(depth 2, width 128, 64 codes of width 8, scales 1..4) and VAR VQ-VAE (see its README.md): the
weights themselves are a seeded function of the key names (weights.py), written here into files
laid out like the released ones (with the reference's mask buffers) and loaded with the normal
loaders. Our engine must reproduce the teacher-forced logits of both variants, the VQ indices,
summed codes and reconstructions, and the reference sampler's logits along its own sampled path.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from svare_core.models import load_transformer, load_vae
from svare_core.models.switti import Switti
from svare_core.models.vqvae import VQVAE

REF = Path(__file__).parent / "fixtures" / "switti_tiny"
ATOL = 1e-4


def _weights_module():
    spec = importlib.util.spec_from_file_location("switti_tiny_weights", REF / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return load_file(str(REF / "goldens.safetensors"))


@pytest.fixture(scope="module")
def ref_config() -> dict:
    return json.loads((REF / "config.json").read_text())


def released_file(path: Path, params: dict, buffers: dict[str, torch.Tensor]) -> Path:
    """The tiny weights in the release's layout: one safetensors file, parameters and buffers."""
    state = _weights_module().tiny_weights({k: tuple(s) for k, s in params.items()})
    save_file({**state, **buffers}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, goldens, ref_config) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("switti_tiny")
    tp = ref_config["transformer_parameters"]
    out = {variant: released_file(d / f"switti_{variant}.safetensors", tp,
                                  {"lvl_1L": goldens["lvl_1L"], "attn_bias_for_masking": goldens[f"mask_{variant}"]})
           for variant in ("default", "ar")}
    rows = ref_config["vae_buffers"]["quantize.ema_vocab_hit_SV"]
    out["vae"] = released_file(d / "vqvae.safetensors", ref_config["vae_parameters"],
                               {"quantize.ema_vocab_hit_SV": torch.zeros(rows)})
    return out


@pytest.fixture(scope="module")
def models(files) -> dict[str, Switti]:
    return {v: load_transformer(files[v]) for v in ("default", "ar")}


@pytest.fixture(scope="module")
def vae(files) -> VQVAE:
    return load_vae(files["vae"])


@pytest.fixture(scope="module")
def scales(ref_config):
    return [(p, p) for p in ref_config["transformer"]["patch_nums"]]


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def per_scale(flat: torch.Tensor, scales) -> list[torch.Tensor]:
    return list(torch.split(flat, [h * w for h, w in scales], dim=1))


def condition(model, goldens, rows=None):
    sl = slice(None) if rows is None else slice(0, rows)
    return model.encode_text(goldens["text_context"][sl], goldens["text_mask"][sl], goldens["text_pooled"][sl])


def test_loaded_architecture(models, vae, ref_config, scales):
    t, v = ref_config["transformer"], ref_config["vae"]
    for variant, model in models.items():
        c = model.cfg
        assert (c.depth, c.embed_dim, c.num_heads, c.vocab_size, c.code_dim) == (
            t["depth"], t["embed_dim"], t["num_heads"], t["V"], t["Cvae"])
        assert c.causal is (variant == "ar") and c.crop_cond and c.scales == scales
    assert (vae.cfg.vocab_size, vae.cfg.z_channels, vae.cfg.ch, vae.cfg.num_phi) == (
        v["vocab_size"], v["z_channels"], v["ch"], v["share_quant_resi"])
    assert vae.cfg.stride == 16 and vae.cfg.stat_rows == len(scales)


@torch.no_grad()
def test_text_and_crop_condition(models, goldens):
    cond = condition(models["default"], goldens)
    close(cond.pooled, goldens["cond_BD"], 1e-5)
    close(cond.crop, goldens["crop_cond"], 1e-5)


@torch.no_grad()
def test_teacher_forcing_inputs(vae, goldens, scales):
    x, _ = vae.teacher_forcing_inputs(per_scale(goldens["tf_indices"], scales), scales)
    close(x, goldens["tf_x"], 1e-5)


@pytest.mark.parametrize("variant", ["default", "ar"])
@torch.no_grad()
def test_teacher_forced_logits(models, goldens, vae, scales, variant):
    model = models[variant]
    cond = condition(model, goldens)
    logits = model(cond, goldens["tf_x"], scales)
    assert logits.shape == (2, 30, 64)
    close(logits, goldens[f"tf_logits_{variant}"])
    x, _ = vae.teacher_forcing_inputs(per_scale(goldens["tf_indices"], scales), scales)
    close(model(cond, x, scales), goldens[f"tf_logits_{variant}"])


def test_variants_differ(goldens):
    # the two masks give different logits: the parity tests above could not pass with the wrong one
    assert (goldens["tf_logits_default"] - goldens["tf_logits_ar"]).abs().max() > 0.1


@torch.no_grad()
def test_vqvae_indices_and_reconstruction(vae, goldens, scales):
    z = vae.encode_latent(goldens["vae_image"])
    close(z, goldens["vae_latent"])
    indices, summed = vae.encode_indices(goldens["vae_image"], scales)
    assert torch.equal(torch.cat(indices, 1), goldens["vae_indices"])
    # from the reference's own latent too
    ref_indices, _ = vae.quantize_multiscale(goldens["vae_latent"], scales)
    assert torch.equal(torch.cat(ref_indices, 1), goldens["vae_indices"])
    close(summed, goldens["vae_summed"])
    close(vae.decode(summed), goldens["vae_recon"])
    close(vae.decode_indices(per_scale(goldens["vae_indices"], scales), scales), goldens["vae_recon"])
    x, _ = vae.teacher_forcing_inputs(indices, scales)
    close(x, goldens["vae_x"], 1e-5)
