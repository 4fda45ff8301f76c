"""The transformer's incremental-decoding API (begin / start_token / step / embed_input): one scale at a
time with the KV cache gives the teacher-forced forward's logits, and the sampler needs nothing else."""
from __future__ import annotations

import pytest
import torch

from svare_core.models.bitwise import teacher_forcing_inputs
from svare_core.models.infinity import DecodeState
from svare_core.pipeline import VARPipeline
from svare_core.sampling import SamplerSettings, generate
from svare_core.schedules import infinity_schedule

from conftest import TINY_SCALES

PROMPTS = ["a red star", "a blue circle on grass"]


def random_bits(scales, rows: int, bits: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (rows, h * w, bits), generator=g).float() for h, w in scales]


def stepped_logits(model, cond, x_inputs: torch.Tensor, scales) -> torch.Tensor:
    """All scales through begin/step, each fed the teacher-forced input of its scale."""
    state = model.begin(cond, scales)
    x, offset, out = model.start_token(cond), 0, []
    for i, (h, w) in enumerate(scales):
        out.append(model.step(state, x))
        if i + 1 < len(scales):
            nh, nw = scales[i + 1]
            x = model.embed_input(x_inputs[:, offset:offset + nh * nw])
            offset += nh * nw
    assert state.done and offset == x_inputs.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("scales", [TINY_SCALES, infinity_schedule("1:1", "0.06M")], ids=["tiny", "official"])
@torch.no_grad()
def test_steps_equal_teacher_forced_forward(tiny_pipeline, scales):
    model = tiny_pipeline.transformer
    cond = tiny_pipeline.condition(PROMPTS)
    x, _ = teacher_forcing_inputs(random_bits(scales, len(PROMPTS), model.cfg.bits), scales)
    full = model(cond, x, scales)
    stepped = stepped_logits(model, cond, x, scales)
    assert stepped.shape == full.shape == (2, sum(h * w for h, w in scales), model.cfg.bits, 2)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_steps_with_guidance_rows(tiny_pipeline):
    """Conditional and unconditional rows in one decode (as the sampler runs CFG) match two forwards."""
    model = tiny_pipeline.transformer
    feats, mask = tiny_pipeline.encode_prompts(PROMPTS)
    cond, uncond = model.encode_text(feats, mask), model.encode_text(model.uncond_features(mask), mask)
    x, _ = teacher_forcing_inputs(random_bits(TINY_SCALES, 2, model.cfg.bits, seed=1), TINY_SCALES)
    stepped = stepped_logits(model, cond.cat(uncond), torch.cat([x, x]), TINY_SCALES)
    torch.testing.assert_close(stepped[:2], model(cond, x, TINY_SCALES), rtol=0, atol=1e-5)
    torch.testing.assert_close(stepped[2:], model(uncond, x, TINY_SCALES), rtol=0, atol=1e-5)


@torch.no_grad()
def test_state_advances_and_caches_grow(tiny_pipeline):
    model = tiny_pipeline.transformer
    cond = tiny_pipeline.condition(PROMPTS[:1])
    state = model.begin(cond, TINY_SCALES)
    assert isinstance(state, DecodeState) and state.index == 0 and not state.done
    assert len(state.caches) == model.cfg.depth
    assert state.ada.shape == (1, 1, 6, model.cfg.embed_dim)
    assert state.rope.shape == (sum(h * w for h, w in TINY_SCALES), model.cfg.head_dim // 2)
    x = model.start_token(cond)
    for i, (h, w) in enumerate(TINY_SCALES):
        logits = model.step(state, x)
        assert logits.shape == (1, h * w, model.cfg.bits, 2) and logits.dtype == torch.float32
        assert state.index == i + 1 and all(c.length == state.offset for c in state.caches)
        if i + 1 < len(TINY_SCALES):
            nh, nw = TINY_SCALES[i + 1]
            x = model.embed_input(torch.zeros(1, nh * nw, model.cfg.bits))
    assert state.done


@torch.no_grad()
def test_step_errors(tiny_pipeline):
    model = tiny_pipeline.transformer
    cond = tiny_pipeline.condition(PROMPTS[:1])
    state = model.begin(cond, TINY_SCALES)
    with pytest.raises(ValueError, match="has 1 tokens"):
        model.step(state, model.embed_input(torch.zeros(1, 4, model.cfg.bits)))
    assert state.index == 0
    state = model.begin(cond, [(1, 1)])
    model.step(state, model.start_token(cond))
    with pytest.raises(ValueError, match="all 1 scales"):
        model.step(state, model.start_token(cond))
    with pytest.raises(ValueError, match="at most 15"):
        model.begin(cond, [(1, 1)] * 16)


class StepOnly:
    """A model of another family as the sampler sees it: only the step API, delegated to an Infinity.

    No attribute falls through, so the sampler reaching into a transformer's internals fails here.
    """

    def __init__(self, inner):
        self._inner = inner
        self.cfg = inner.cfg
        self.calls: list[str] = []

    @property
    def device(self) -> torch.device:
        return self._inner.device

    def _call(self, name: str, *args):
        self.calls.append(name)
        return getattr(self._inner, name)(*args)

    def encode_text(self, features, mask):
        return self._call("encode_text", features, mask)

    def uncond_features(self, mask):
        return self._call("uncond_features", mask)

    def begin(self, cond, scales):
        return self._call("begin", cond, scales)

    def start_token(self, cond):
        return self._call("start_token", cond)

    def step(self, state, x):
        return self._call("step", state, x)

    def embed_input(self, token_rows):
        return self._call("embed_input", token_rows)


def test_sampler_needs_only_the_step_api(tiny_pipeline):
    settings = SamplerSettings(cfg=3.0)
    ref = generate(tiny_pipeline, PROMPTS, seed=5, settings=settings)
    wrapped = StepOnly(tiny_pipeline.transformer)
    pipe = VARPipeline(wrapped, tiny_pipeline.vae, tiny_pipeline.text_encoder, name="step-only",
                       scales=list(TINY_SCALES), base_fingerprint="-")
    out = generate(pipe, PROMPTS, seed=5, settings=settings)
    assert all(torch.equal(a, b) for a, b in zip(ref.bits, out.bits))
    assert torch.equal(ref.images, out.images)
    n = len(TINY_SCALES)
    assert wrapped.calls.count("step") == n and wrapped.calls.count("embed_input") == n - 1
    assert wrapped.calls.count("begin") == 1 and wrapped.calls.count("start_token") == 1
