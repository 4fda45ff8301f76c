"""Issue 17, fewer passes: the frozen model's conditional and unconditional logits come from one batched
forward; they must match the two separate passes within the stated tolerance (a larger product rounds
differently, so not bit for bit), for guided teacher targets and for ESD's targets alike."""
from __future__ import annotations

import torch

from svare_core.erasure import EraseConfig, expand_concept
from svare_core.erasure.losses import esd_target, guided_logits
from svare_core.erasure.methods import ESD
from svare_core.erasure.run import BATCHED_PASS_ATOL, ErasureRun
from svare_core.erasure.tokens import AuxTokens
from svare_core.models.bitwise import teacher_forcing_inputs

from conftest import TINY_SCALES

PROMPTS = ["a red star", "a red circle on grass", "a red square"]


def _run(pipe) -> ErasureRun:
    return ErasureRun(pipe, pipe.transformer, pipe.transformer, EraseConfig(), expand_concept("red", "blue", "toy"),
                      [], TINY_SCALES, generator=torch.Generator().manual_seed(0))


def _inputs(model, rows: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = [torch.randint(0, 2, (rows, h * w, model.cfg.bits), generator=g).float() for h, w in TINY_SCALES]
    return teacher_forcing_inputs(bits, TINY_SCALES)[0]


def _separate(pipe, prompts, x):
    model = pipe.transformer
    feats, mask = pipe.encode_prompts(prompts)
    with torch.no_grad():
        cond = model(model.encode_text(feats, mask), x, TINY_SCALES)
        uncond = model(model.encode_text(model.uncond_features(mask), mask), x, TINY_SCALES)
    return cond, uncond


def test_one_batched_frozen_pass_matches_two(tiny_pipeline):
    run, x = _run(tiny_pipeline), _inputs(tiny_pipeline.transformer, len(PROMPTS))
    cond, uncond = _separate(tiny_pipeline, PROMPTS, x)
    bcond, buncond = run.frozen_pair(PROMPTS, x)
    assert not torch.allclose(cond, uncond, atol=1e-3)       # the halves differ: a swap or a mix-up would show
    torch.testing.assert_close(bcond, cond, rtol=0, atol=BATCHED_PASS_ATOL)
    torch.testing.assert_close(buncond, uncond, rtol=0, atol=BATCHED_PASS_ATOL)
    # Guided at CFG 3, temperature 0.5: the error of each half, scaled by |3| + |1 - 3| and 1 / tau.
    guided = run.frozen_logits(PROMPTS, x, 3.0, 0.5)
    torch.testing.assert_close(guided, guided_logits(cond, uncond, 3.0, 0.5), rtol=0, atol=10 * BATCHED_PASS_ATOL)
    # Guidance 1 is the conditional pass alone, as before: bit for bit.
    assert torch.equal(run.frozen_logits(PROMPTS, x, 1.0, 0.5), cond / 0.5)


def test_esd_targets_from_the_batched_pass(tiny_pipeline):
    run = _run(tiny_pipeline)
    x = _inputs(tiny_pipeline.transformer, 2, seed=5)
    run.aux = {p.unsafe: AuxTokens(torch.zeros(2, 1, 1), x) for p in run.pairs}
    targets = ESD().teacher_targets(run)
    assert set(targets) == {p.unsafe for p in run.pairs}
    for prompt, target in targets.items():
        concept, empty = _separate(tiny_pipeline, [prompt] * 2, x)
        expected = esd_target(empty, concept, run.cfg.research.esd_eta)
        torch.testing.assert_close(target, expected, rtol=0, atol=3 * BATCHED_PASS_ATOL)
