"""Switti's sampler on the tiny parity model: the guidance ramp and its on/off scales, the final
temperature, top-k/top-p, Gumbel soft codes with hard indices, per-image seeds, and the decode
loop against one teacher-forced pass over what it drew (both variants)."""
from __future__ import annotations

import math

import pytest
import torch

from svare_core.pipeline import VARPipeline
from svare_core.sampling import generate
from svare_core.sampling_vq import VQSamplerSettings, filter_top_k_top_p, guide
from svare_core.schedules import num_tokens, switti_schedule
from tests.test_switti_parity import (GoldenText, close, files, goldens, models, per_scale, ref_config,  # noqa: F401
                                      scales, vae)


@pytest.fixture(scope="module")
def pipes(models, vae, goldens):  # noqa: F811
    return {v: VARPipeline(m, vae, GoldenText(goldens), name=f"switti_tiny_{v}", family="switti") for v, m in models.items()}


def test_schedules():
    assert (len(switti_schedule(14)), num_tokens(switti_schedule(14)), switti_schedule(14)[-1]) == (14, 9451, (64, 64))
    assert (len(switti_schedule(10)), num_tokens(switti_schedule(10)), switti_schedule(10)[-1]) == (10, 2240, (32, 32))
    with pytest.raises(ValueError, match="10 .* or 14"):
        switti_schedule(15)


def test_top_k_keeps_ties_and_top_p_keeps_the_best():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    kept = filter_top_k_top_p(logits, 2, 0.0).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]        # both 2.0s tie with the 2nd value
    assert filter_top_k_top_p(logits, 0, 1e-6).isfinite().tolist() == [[True, False, False, False, False]]
    p = logits.softmax(-1)[0]
    kept = filter_top_k_top_p(logits, 0, 0.9).isfinite()[0]
    # the dropped tail holds at most 1 - top_p of the mass, and one more token would exceed it
    assert p[~kept].sum() <= 0.1 and p[~kept].sum() + p[kept].min() > 0.1


def test_guidance_ramp_and_switch_off():
    n, rows = 5, 1
    cond, uncond = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 1.0)
    both = torch.cat([cond, uncond])
    s = VQSamplerSettings(cfg=4.0, cfg_start=1, cfg_stop=3, final_tau=0.5)
    assert torch.equal(guide(both, 0, n, rows, s), cond)                        # before cfg_start
    for si in (1, 2):
        t = 4.0 * si / (n - 1)
        close(guide(both, si, n, rows, s), (1 + t) * cond - t * uncond)
    for si in (3, 4):                                                           # every scale from cfg_stop on
        close(guide(cond, si, n, rows, s), cond / 0.5)


def test_validation():
    with pytest.raises(ValueError, match="one number"):
        VQSamplerSettings(cfg=[1.0, 2.0]).validate()
    with pytest.raises(ValueError, match="final_tau"):
        VQSamplerSettings(final_tau=0.0).validate()
    with pytest.raises(ValueError, match="cfg_stop"):
        VQSamplerSettings(cfg_stop=-1).validate()


def test_square_only(pipes):
    with pytest.raises(ValueError, match="square"):
        generate(pipes["default"], ["p0"], aspect_ratio="16:9", settings=VQSamplerSettings(smooth=False))


@pytest.mark.parametrize("variant", ["default", "ar"])
def test_decode_loop_matches_teacher_forcing(pipes, vae, scales, variant):  # noqa: F811
    """Free-running: the per-scale conditional logits of the step loop (text K/V cached, the AR
    variant's self-attention cache) equal one teacher-forced pass over the tokens it drew."""
    pipe = pipes[variant]
    s = VQSamplerSettings(cfg=3.0, top_k=0, top_p=0.0, smooth=False, cfg_stop=2, final_tau=None)
    out = generate(pipe, ["p0", "p1"], seed=3, settings=s, return_logits=True)
    x, summed = vae.teacher_forcing_inputs(out.indices, scales)
    close(summed, out.summed_codes, 1e-5)
    with torch.no_grad():
        tf = pipe.transformer(pipe.condition(["p0", "p1"]), x, scales)
    close(torch.cat(out.logits, 1), tf)
    assert out.images.shape == (2, 64, 64, 3)


def test_images_do_not_depend_on_the_batch(pipes):
    s = VQSamplerSettings(cfg=3.0, top_k=10, top_p=0.9, smooth=False, cfg_stop=3)
    both = generate(pipes["default"], ["p0", "p1"], seed=11, settings=s)
    alone = generate(pipes["default"], ["p1"], seed=12, settings=s)
    for a, b in zip(both.indices, alone.indices):
        assert torch.equal(a[1:], b)
    close(both.images[1:], alone.images, 1e-5)
    assert both.seeds == [11, 12]


def test_smooth_codes_are_soft_but_indices_hard(pipes, vae, scales):  # noqa: F811
    s = VQSamplerSettings(cfg=3.0, smooth=True, smooth_start=1, cfg_stop=3, final_tau=0.5)
    out = generate(pipes["default"], ["p0", "p1"], seed=5, settings=s)
    assert out.soft == [False, True, True, False]        # from smooth_start until guidance is off
    for idx in out.indices:
        assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) < 64
    # the decoder saw soft codes: the hard indices' own sum differs
    _, hard_sum = vae.teacher_forcing_inputs(out.indices, scales)
    assert (hard_sum - out.summed_codes).abs().max() > 1e-3
    hard = generate(pipes["default"], ["p0", "p1"], seed=5, settings=VQSamplerSettings(
        cfg=3.0, smooth=False, cfg_stop=3, final_tau=0.5))
    assert hard.soft == [False] * 4 and math.isfinite(float(hard.images.sum()))


def test_working_memory_estimate(pipes, scales):  # noqa: F811
    from svare_core import memory
    default = memory.sampling_bytes(pipes["default"], 1, scales)
    ar = memory.sampling_bytes(pipes["ar"], 1, scales)
    assert 0 < default < ar          # only the AR variant keeps a self-attention cache


def test_bf16_end_to_end(files, goldens):  # noqa: F811
    """The AR variant and the VQ-VAE both in bf16 (as on a GPU): soft and hard scales, finite images."""
    from svare_core.models import load_transformer, load_vae
    pipe = VARPipeline(load_transformer(files["ar"], dtype=torch.bfloat16), load_vae(files["vae"], dtype=torch.bfloat16),
                       GoldenText(goldens), family="switti")
    out = generate(pipe, ["p0", "p1"], seed=1, settings=VQSamplerSettings(cfg=3.0, top_k=10, cfg_stop=3, smooth_start=1))
    assert out.soft == [False, True, True, False]
    assert out.images.dtype == torch.float32 and bool(torch.isfinite(out.images).all())
