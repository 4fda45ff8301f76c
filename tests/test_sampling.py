"""Next-scale sampling: seeds, guidance, top-k/top-p, callbacks, cancellation, output layout, and the
official scale schedules (every aspect ratio and preset) with a tiny model shaped like the real ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svare_core.models.bitwise import add_scale
from svare_core.models.infinity import Infinity
from svare_core.models.vae import BSQVAE
from svare_core.pipeline import VARPipeline
from svare_core.sampling import Cancelled, SamplerSettings, generate
from svare_core.schedules import aspect_ratios, infinity_schedule, num_tokens, presets, reference_grid

from conftest import TINY_SCALES, randomise, tiny_transformer_config, tiny_vae_config

PROMPTS = ["a red star", "a blue circle on grass", "two green squares"]
TABLE = json.loads((Path(__file__).parents[1] / "svare_core" / "data" / "scale_schedules.json").read_text())


def bits_of(result, i=None) -> torch.Tensor:
    b = torch.cat(result.bits, dim=1)
    return b if i is None else b[i]


# -- seeds and batching ------------------------------------------------------------------------------
def test_batch_equals_single_runs(tiny_pipeline):
    batch = generate(tiny_pipeline, PROMPTS, seed=10)
    assert batch.seeds == [10, 11, 12]
    for i, p in enumerate(PROMPTS):
        single = generate(tiny_pipeline, [p], seed=10 + i)
        assert torch.equal(bits_of(single, 0), bits_of(batch, i)), f"image {i} depends on its batch"
        torch.testing.assert_close(single.images[0], batch.images[i], rtol=0, atol=1e-5)


def test_same_seed_is_reproducible_and_seeds_differ(tiny_pipeline):
    a = generate(tiny_pipeline, ["a red star"], seed=1)
    b = generate(tiny_pipeline, ["a red star"], seed=1)
    c = generate(tiny_pipeline, ["a red star"], seed=2)
    assert torch.equal(bits_of(a), bits_of(b))
    assert not torch.equal(bits_of(a), bits_of(c))
    # the same prompt twice in one batch gets two different images (seed + i)
    d = generate(tiny_pipeline, ["a red star", "a red star"], seed=1)
    assert torch.equal(bits_of(d, 0), bits_of(a, 0)) and torch.equal(bits_of(d, 1), bits_of(c, 0))


def test_empty_prompt_list(tiny_pipeline):
    with pytest.raises(ValueError):
        generate(tiny_pipeline, [])


# -- guidance ----------------------------------------------------------------------------------------
def test_cfg_per_scale_list(tiny_pipeline):
    n = len(TINY_SCALES)
    out = generate(tiny_pipeline, ["a red star"], seed=0, settings=SamplerSettings(cfg=[1.0, 2.0, 3.0, 4.0]))
    assert len(out.bits) == n
    const = generate(tiny_pipeline, ["a red star"], seed=0, settings=SamplerSettings(cfg=[3.0] * n))
    scalar = generate(tiny_pipeline, ["a red star"], seed=0, settings=SamplerSettings(cfg=3.0))
    assert torch.equal(bits_of(const), bits_of(scalar))
    for bad in ([3.0] * (n - 1), [3.0] * (n + 1)):
        with pytest.raises(ValueError, match="one value per scale"):
            generate(tiny_pipeline, ["a red star"], settings=SamplerSettings(cfg=bad))


def test_cfg_one_has_no_uncond_rows(tiny_pipeline, monkeypatch):
    ref = generate(tiny_pipeline, ["a red star"], seed=4, settings=SamplerSettings(cfg=1.0))
    model = tiny_pipeline.transformer

    def refuse(*a, **k):
        raise AssertionError("cfg=1 must not build unconditional rows")

    monkeypatch.setattr(model, "uncond_features", refuse)
    rows = []
    orig = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda f, m: rows.append(f.shape[0]) or orig(f, m))
    out = generate(tiny_pipeline, ["a red star", "x"], seed=4, settings=SamplerSettings(cfg=1.0))
    assert rows == [2]
    assert torch.equal(bits_of(out, 0), bits_of(ref, 0))
    listed = generate(tiny_pipeline, ["a red star"], seed=4, settings=SamplerSettings(cfg=[1.0] * len(TINY_SCALES)))
    assert torch.equal(bits_of(listed), bits_of(ref))


def test_cfg_one_ignores_learned_empty_prompt(tiny_pipeline):
    before1 = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=1.0))
    before3 = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=3.0))
    with torch.no_grad():
        tiny_pipeline.transformer.cfg_uncond.add_(torch.randn_like(tiny_pipeline.transformer.cfg_uncond))
    after1 = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=1.0))
    after3 = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=3.0))
    assert torch.equal(bits_of(before1), bits_of(after1))
    assert not torch.equal(bits_of(before3), bits_of(after3))


def test_negative_prompt_changes_output(tiny_pipeline):
    plain = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=4.0))
    neg = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=4.0, negative_prompt="blurry, ugly"))
    assert not torch.equal(bits_of(plain), bits_of(neg))
    # the conditional logits of the first scale do not depend on the guidance
    a = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=4.0), return_logits=True)
    b = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(cfg=4.0, negative_prompt="blurry"),
                 return_logits=True)
    torch.testing.assert_close(a.logits[0], b.logits[0], rtol=0, atol=1e-5)


# -- top-k / top-p / tau ------------------------------------------------------------------------------
def test_top_k_one_is_greedy_and_seed_independent(tiny_pipeline):
    s = SamplerSettings(top_k=1)
    a = generate(tiny_pipeline, PROMPTS, seed=0, settings=s)
    b = generate(tiny_pipeline, PROMPTS, seed=123, settings=s)
    assert torch.equal(bits_of(a), bits_of(b))
    # greedy: every bit is the likelier value under the guided logits
    out = generate(tiny_pipeline, ["a red star"], seed=0, settings=SamplerSettings(top_k=1, cfg=1.0), return_logits=True)
    for logits, bits in zip(out.logits, out.bits):
        assert torch.equal((logits[..., 1] > logits[..., 0]).float(), bits)


def test_top_k_two_or_more_is_off(tiny_pipeline):
    base = generate(tiny_pipeline, PROMPTS, seed=5)
    assert torch.equal(bits_of(base), bits_of(generate(tiny_pipeline, PROMPTS, seed=5, settings=SamplerSettings(top_k=2))))
    assert torch.equal(bits_of(base), bits_of(generate(tiny_pipeline, PROMPTS, seed=5, settings=SamplerSettings(top_k=900))))


def test_top_p(tiny_pipeline):
    off = generate(tiny_pipeline, PROMPTS, seed=7, settings=SamplerSettings(top_p=0.0))
    full = generate(tiny_pipeline, PROMPTS, seed=7, settings=SamplerSettings(top_p=1.0))
    # top_p = 1 keeps both values of every bit: plain sampling, like top_p = 0 (off)
    assert torch.equal(bits_of(off), bits_of(full))
    # top_p <= 0.5: the likelier value alone always covers it -> greedy, seed-independent
    greedy = generate(tiny_pipeline, PROMPTS, seed=7, settings=SamplerSettings(top_k=1))
    for seed in (7, 8):
        half = generate(tiny_pipeline, PROMPTS, seed=seed, settings=SamplerSettings(top_p=0.5))
        assert torch.equal(bits_of(half), bits_of(greedy))
    assert not torch.equal(bits_of(off), bits_of(greedy))


def test_top_p_keeps_confident_bits():
    from svare_core.sampling import sample_bits
    probs = torch.tensor([0.99, 0.01, 0.6, 0.4])
    u = torch.tensor([0.995, 0.001, 0.9, 0.1])        # plain sampling would flip all four
    assert sample_bits(probs, u).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert sample_bits(probs, u, top_p=0.97).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert sample_bits(probs, u, top_k=1).tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("kw,match", [(dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(top_p=1.5), "top_p"),
                                      (dict(top_p=-0.1), "top_p"), (dict(top_k=-1), "top_k")])
def test_settings_validation(tiny_pipeline, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_pipeline, ["a"], settings=SamplerSettings(**kw))


def test_low_tau_is_near_greedy(tiny_pipeline):
    greedy = generate(tiny_pipeline, PROMPTS, seed=0, settings=SamplerSettings(top_k=1))
    cold = generate(tiny_pipeline, PROMPTS, seed=99, settings=SamplerSettings(tau=1e-4))
    assert (bits_of(cold) != bits_of(greedy)).float().mean() < 0.01


# -- callback and cancellation ---------------------------------------------------------------------------
def test_callback_per_scale(tiny_pipeline):
    steps = []
    out = generate(tiny_pipeline, PROMPTS[:2], seed=3, callback=lambda st: steps.append(st))
    n = len(TINY_SCALES)
    assert [s.index for s in steps] == list(range(n))
    assert all(s.total == n for s in steps)
    assert [s.grid for s in steps] == TINY_SCALES
    d = tiny_pipeline.transformer.cfg.bits
    summed = torch.zeros(2, d, *TINY_SCALES[-1])
    prev = None
    for st, bits, grid in zip(steps, out.bits, TINY_SCALES):
        summed = add_scale(summed, bits, grid)
        assert st.summed_codes.shape == (2, d, *TINY_SCALES[-1])
        torch.testing.assert_close(st.summed_codes.cpu(), summed, rtol=0, atol=1e-6)
        if prev is not None:
            assert not torch.equal(st.summed_codes, prev)
        prev = st.summed_codes.clone()
    torch.testing.assert_close(steps[-1].summed_codes.cpu(), out.summed_codes, rtol=0, atol=0)


def test_cancel_from_callback(tiny_pipeline):
    seen = []

    def cb(step):
        seen.append(step.index)
        if step.index == 1:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        generate(tiny_pipeline, ["a red star"], seed=0, callback=cb)
    assert seen == [0, 1]


# -- outputs ---------------------------------------------------------------------------------------------
def test_image_layout(tiny_pipeline):
    out = generate(tiny_pipeline, PROMPTS, seed=0)
    H, W = TINY_SCALES[-1]
    f = tiny_pipeline.vae.cfg.stride
    assert out.images.shape == (3, H * f, W * f, 3)
    assert out.images.dtype == torch.float32 and out.images.device.type == "cpu"
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.summed_codes.shape == (3, 8, H, W)
    assert out.scales == TINY_SCALES
    for bits, (h, w) in zip(out.bits, TINY_SCALES):
        assert bits.shape == (3, h * w, 8) and set(bits.unique().tolist()) <= {0.0, 1.0}
    assert out.logits is None


# -- schedules --------------------------------------------------------------------------------------------
def _expected(name: str, preset: str) -> list[tuple[int, int]]:
    h, w = (int(v) for v in name.split(":"))
    r = max(h, w) / min(h, w)
    keys = [k for k in TABLE["ratio_to_hw"] if abs(float(k) - r) < 0.01]
    assert len(keys) == 1, (name, keys)
    grids = TABLE["ratio_to_hw"][keys[0]][: TABLE["preset_num_scales"][preset]]
    return [(a, b) if h >= w else (b, a) for a, b in grids]


def test_aspect_ratio_names_cover_table():
    names = aspect_ratios()
    assert len(names) == len(set(names)) == 2 * len(TABLE["ratio_to_hw"]) - 1
    assert "1:1" in names and "16:9" not in names
    assert presets() == TABLE["preset_num_scales"] == {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


@pytest.mark.parametrize("name", aspect_ratios())
def test_every_ratio_and_preset(name):
    h, w = (int(v) for v in name.split(":"))
    full = infinity_schedule(name, "1M")
    for preset, n in presets().items():
        sched = infinity_schedule(name, preset)
        assert sched == _expected(name, preset)
        assert len(sched) == n and sched == full[:n]
        assert sched[0] == (1, 1)
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(sched, sched[1:]))
        # RoPE positions of every preset are measured on the 1M grid of the same ratio
        assert reference_grid(sched, (0, 0)) == full[-1]
    H, W = full[-1]
    assert abs((H / W) / (h / w) - 1) < 0.03
    assert 0.8e6 < num_tokens([full[-1]]) * 256 < 1.3e6     # about 1 megapixel at stride 16


def test_schedule_errors():
    with pytest.raises(ValueError, match="preset"):
        infinity_schedule("1:1", "2M")
    with pytest.raises(ValueError, match="not in Infinity's table"):
        infinity_schedule("16:9", "1M")
    with pytest.raises(ValueError, match="must look like"):
        infinity_schedule("square", "1M")


def test_reference_grid():
    assert reference_grid(infinity_schedule("1:1", "0.06M"), (4, 4)) == (64, 64)
    assert reference_grid(infinity_schedule("1:2", "0.25M"), (4, 4)) == (45, 90)
    assert reference_grid(TINY_SCALES, (4, 4)) == (4, 4)          # not an official schedule: the model's own


@pytest.mark.parametrize("ratio", ["1:1", "2:3", "5:2"])
def test_generate_with_official_schedule(text_encoder, ratio):
    """A tiny model shaped like the released ones (no schedule of its own, 64x64 RoPE grid) samples any
    official schedule; the image is the VAE stride times the last grid."""
    torch.manual_seed(0)
    cfg = tiny_transformer_config(scales=[], rope_grid=(64, 64), depth=1, num_block_chunks=1)
    transformer = randomise(Infinity(cfg)).eval()
    vae = randomise(BSQVAE(tiny_vae_config()), seed=1).eval()
    pipe = VARPipeline(transformer, vae, text_encoder, name="tiny-real-shaped")
    sched = infinity_schedule(ratio, "0.06M")
    steps = []
    out = generate(pipe, ["a red star"], seed=0, scales=sched, callback=steps.append)
    H, W = sched[-1]
    f = vae.cfg.stride
    assert out.images.shape == (1, H * f, W * f, 3)
    assert out.scales == sched and len(steps) == len(sched)
    assert [b.shape[1] for b in out.bits] == [h * w for h, w in sched]
    # without scales, the pipeline falls back to the official table for the ratio and preset
    out2 = generate(pipe, ["a red star"], seed=0, aspect_ratio=ratio, preset="0.06M")
    assert out2.scales == sched and torch.equal(bits_of(out2), bits_of(out))


def test_too_many_scales_rejected(text_encoder):
    cfg = tiny_transformer_config(scales=[], num_levels=6)
    pipe = VARPipeline(Infinity(cfg).eval(), BSQVAE(tiny_vae_config()).eval(), text_encoder)
    with pytest.raises(ValueError, match="at most 6"):
        generate(pipe, ["a"], scales=infinity_schedule("1:1", "0.06M"))


def test_tokens_only_draws_the_same_bits_without_decoding(tiny_pipeline, monkeypatch):
    full = generate(tiny_pipeline, ["a red star"], seed=3)
    import svare_core.sampling as sampling_module
    monkeypatch.setattr(sampling_module, "_decode_images", lambda *a: pytest.fail("decoded although decode=False"))
    bits_only = generate(tiny_pipeline, ["a red star"], seed=3, decode=False)
    assert bits_only.images.numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(full.bits, bits_only.bits))
