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

import svare_core.sampling_vq as sampling_vq
from svare_core.models import load_transformer, load_vae
from svare_core.pipeline import VARPipeline
from svare_core.sampling import generate
from svare_core.sampling_vq import VQSamplerSettings
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


# -- the sampler ------------------------------------------------------------------------------------
class GoldenText:
    """Stands in for Switti's two CLIP encoders: prompts "p0", "p1" and the null prompt "" map to the
    golden features (the reference pads every prompt to the same length)."""
    width = 2048

    def __init__(self, goldens):
        self.rows = {f"p{i}": (goldens["text_context"][i], goldens["text_mask"][i], goldens["text_pooled"][i])
                     for i in range(2)}
        self.rows[""] = (goldens["null_context"][0], goldens["null_mask"][0], goldens["null_pooled"][0])

    def encode(self, prompts):
        ctx, mask, pooled = zip(*(self.rows[p] for p in prompts))
        return torch.stack(ctx), torch.stack(mask), torch.stack(pooled)


def reference_settings(ref_config) -> VQSamplerSettings:
    s = ref_config["sampling"]
    return VQSamplerSettings(cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"], smooth=s["more_smooth"],
                             cfg_start=s["turn_on_cfg_start_si"], cfg_stop=s["turn_off_cfg_start_si"],
                             final_tau=s["last_scale_temp"])


RUNS = [("sample_default", "default", 2), ("sample_ar", "ar", 2), ("sample_default_b1", "default", 1)]


@pytest.mark.parametrize("tag,variant,rows", RUNS, ids=[r[0] for r in RUNS])
@torch.no_grad()
def test_reference_sampler_logits_along_its_path(models, vae, goldens, scales, ref_config, tag, variant, rows):
    """The reference sampler's tokens, teacher-forced through our model, give its raw cond/uncond logits."""
    model, stop = models[variant], ref_config["sampling"]["turn_off_cfg_start_si"]
    x, _ = vae.teacher_forcing_inputs(per_scale(goldens[f"{tag}_indices"], scales), scales)
    cond = per_scale(model(condition(model, goldens, rows), x, scales), scales)
    null = model.encode_text(goldens["null_context"].expand(rows, -1, -1), goldens["null_mask"].expand(rows, -1),
                             goldens["null_pooled"].expand(rows, -1))
    uncond = per_scale(model(null, x, scales), scales)
    for si in range(len(scales)):
        raw = goldens[f"{tag}_raw_{si}"]
        assert raw.shape[0] == (2 * rows if si < stop else rows)
        close(cond[si], raw[:rows])
        if si < stop:
            close(uncond[si], raw[rows:])


@pytest.mark.parametrize("tag,variant,rows", RUNS, ids=[r[0] for r in RUNS])
def test_sampler_follows_reference(models, vae, goldens, scales, ref_config, monkeypatch, tag, variant, rows):
    """Our sampler, its draws forced onto the reference's tokens, sees the reference's guided logits
    at every scale and decodes the reference's image."""
    ref = per_scale(goldens[f"{tag}_indices"], scales)
    seen = []

    def forced(logits, generators, top_k, top_p):
        seen.append(logits.clone())
        return ref[len(seen) - 1]

    monkeypatch.setattr(sampling_vq, "draw_indices", forced)
    pipe = VARPipeline(models[variant], vae, GoldenText(goldens), name="switti_tiny", family="switti")
    prompts = ["p0", "p1"][:rows]
    out = generate(pipe, prompts, seed=7, settings=reference_settings(ref_config), return_logits=True)
    assert len(seen) == len(scales) and out.soft == [False] * len(scales)
    for si in range(len(scales)):
        close(seen[si], goldens[f"{tag}_guided_{si}"])
        close(out.logits[si], goldens[f"{tag}_raw_{si}"][:rows])
        assert torch.equal(out.indices[si], ref[si])
    close(out.images, goldens[f"{tag}_image"].permute(0, 2, 3, 1))


def test_sampler_draws_what_the_reference_draws(models, vae, goldens, ref_config):
    """One prompt: the same seed gives the reference's own tokens (one multinomial call per scale on
    a CPU generator seeded alike) and its image."""
    pipe = VARPipeline(models["default"], vae, GoldenText(goldens), name="switti_tiny", family="switti")
    out = generate(pipe, ["p0"], seed=ref_config["sampling"]["seed"], settings=reference_settings(ref_config))
    assert torch.equal(torch.cat(out.indices, 1), goldens["sample_default_b1_indices"])
    close(out.images, goldens["sample_default_b1_image"].permute(0, 2, 3, 1))


def test_smooth_sampler_reproduces_the_reference(models, vae, goldens, ref_config):
    """Gumbel soft codes from scale 1 (one prompt): the same noise draws as the reference's, so the
    same logits at every scale and the same image."""
    pipe = VARPipeline(models["default"], vae, GoldenText(goldens), name="switti_tiny", family="switti")
    s = reference_settings(ref_config)
    s.smooth, s.smooth_start = True, ref_config["sampling_smooth_b1"]["smooth_start_si"]
    out = generate(pipe, ["p0"], seed=ref_config["sampling"]["seed"], settings=s, return_logits=True)
    assert out.soft == [False, True, True, False]          # soft from scale 1 until guidance is off (3)
    for si in range(len(out.logits)):
        close(out.logits[si], goldens[f"sample_smooth_b1_raw_{si}"][:1])
    close(out.images, goldens["sample_smooth_b1_image"].permute(0, 2, 3, 1))
    # and it is not the hard sampler's image
    assert (goldens["sample_smooth_b1_image"] - goldens["sample_default_b1_image"]).abs().max() > 0.01
