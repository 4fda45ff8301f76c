"""Nothing computed twice (issue 17): a decode projects the text's cross-attention keys and values once
per block, the RoPE cos/sin once per schedule, and writes the KV cache into preallocated buffers; each
gives the very bits and logits of the old path (recomputed every scale, cache grown by concatenation)."""
from __future__ import annotations

import pytest
import torch

from svare_core.models.attention import CrossAttention, KVCache, Rotation, apply_rope, rope_table
from svare_core.models.bitwise import teacher_forcing_inputs
from svare_core.models.infinity import Infinity
from svare_core.sampling import SamplerSettings, generate
from svare_core.schedules import infinity_schedule, reference_grid

from conftest import TINY_SCALES

PROMPTS = ["a red star", "a blue circle on grass"]


def _old_path(monkeypatch, model: Infinity) -> None:
    """Make ``model`` decode as before issue 17: raw angles (cos/sin in every block, for queries and keys),
    caches grown by concatenation, the text's keys and values projected again at every scale."""
    def rope_angles(scales):
        grid = reference_grid(scales, model.cfg.rope_grid)
        return rope_table(scales, model.cfg.head_dim, grid, model.cfg.rope_theta, model.device)

    def old_begin(cond, scales, _begin=Infinity.begin.__get__(model)):
        state = _begin(cond, scales)
        state.caches = [KVCache() for _ in model.blocks]
        return state

    def old_step(state, x, _step=Infinity.step.__get__(model)):
        for cache in state.caches:
            cache.text_kv = None
        return _step(state, x)

    class Angles(torch.Tensor):
        def rows(self, start, end):
            return self[start:end]

    monkeypatch.setattr(model, "rope_for", lambda scales: rope_angles(scales).as_subclass(Angles))
    monkeypatch.setattr(model, "begin", old_begin)
    monkeypatch.setattr(model, "step", old_step)


@pytest.mark.parametrize("scales", [TINY_SCALES, infinity_schedule("1:1", "0.06M")], ids=["tiny", "official"])
def test_decode_is_bit_identical_to_the_old_path(tiny_pipeline, monkeypatch, scales):
    settings = SamplerSettings(cfg=3.0, top_p=0.9)
    new = generate(tiny_pipeline, PROMPTS, seed=3, settings=settings, scales=scales, return_logits=True)
    with monkeypatch.context() as m:
        _old_path(m, tiny_pipeline.transformer)
        old = generate(tiny_pipeline, PROMPTS, seed=3, settings=settings, scales=scales, return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(new.logits, old.logits))
    assert all(torch.equal(a, b) for a, b in zip(new.bits, old.bits))
    assert torch.equal(new.images, old.images)


def test_text_keys_and_values_are_projected_once_per_block(tiny_pipeline, monkeypatch):
    calls = []
    original = CrossAttention.text_kv
    monkeypatch.setattr(CrossAttention, "text_kv", lambda self, text: calls.append(self) or original(self, text))
    generate(tiny_pipeline, PROMPTS, seed=0, decode=False)
    blocks = tiny_pipeline.transformer.blocks
    assert len(calls) == len(blocks) and {id(c) for c in calls} == {id(b.ca) for b in blocks}


def test_preallocated_cache_matches_concatenation():
    g = torch.Generator().manual_seed(0)
    grown, fixed = KVCache(), KVCache(capacity=14)
    for n in (1, 4, 9):
        k, v = torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8, generator=g)
        (k1, v1), (k2, v2) = grown.extend(k, v), fixed.extend(k, v)
        assert torch.equal(k1, k2) and torch.equal(v1, v2) and fixed.length == k1.shape[2]
    with pytest.raises(ValueError, match="holds 14 tokens; 15 do not fit"):
        fixed.extend(torch.zeros(2, 3, 1, 8), torch.zeros(2, 3, 1, 8))


def test_rope_is_computed_once_per_schedule_and_equals_the_angles(tiny_pipeline, monkeypatch):
    model = tiny_pipeline.transformer
    rot = model.rope_for(TINY_SCALES)
    assert model.rope_for([list(s) for s in TINY_SCALES]) is rot
    angles = rope_table(TINY_SCALES, model.cfg.head_dim, reference_grid(TINY_SCALES, model.cfg.rope_grid),
                        model.cfg.rope_theta)
    x = torch.randn(2, model.cfg.num_heads, angles.shape[0], model.cfg.head_dim)
    assert isinstance(rot, Rotation) and torch.equal(apply_rope(x, rot), apply_rope(x, angles))
    # The teacher-forced forward too gives what the per-block cos/sin gave.
    cond = tiny_pipeline.condition(PROMPTS)
    bits = [torch.randint(0, 2, (2, h * w, model.cfg.bits), generator=torch.Generator().manual_seed(1)).float()
            for h, w in TINY_SCALES]
    xin, _ = teacher_forcing_inputs(bits, TINY_SCALES)
    with torch.no_grad():
        new = model(cond, xin, TINY_SCALES)
        monkeypatch.setattr(model, "rope_for", lambda scales: angles)
        assert torch.equal(new, model(cond, xin, TINY_SCALES))


def test_rope_made_in_inference_mode_does_not_reach_training(tiny_pipeline):
    """ComfyUI samples under inference_mode; a later training pass must not get those tensors (they
    cannot be saved for backward)."""
    model = tiny_pipeline.transformer
    with torch.inference_mode():
        inference = model.rope_for(TINY_SCALES)
    assert model.rope_for(TINY_SCALES) is not inference and not model.rope_for(TINY_SCALES).cos.is_inference()
    cond = tiny_pipeline.condition(PROMPTS[:1])
    xin = torch.zeros(1, sum(h * w for h, w in TINY_SCALES) - 1, model.cfg.bits)
    w = model.blocks[0].sa.mat_qkv.weight
    w.requires_grad_(True)
    try:
        model(cond, xin, TINY_SCALES).sum().backward()
        assert w.grad is not None
    finally:
        w.requires_grad_(False)
        w.grad = None
