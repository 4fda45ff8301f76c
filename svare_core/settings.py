"""Default settings, in one place: each model family declares its own, one function resolves them.

A pipeline's ``family`` comes from its model file (svare files record it; released Infinity
checkpoints are Infinity's). Plug-ins add families (svare_core.plugins). The nodes, the CLI and
the Python API all resolve settings through :func:`resolve_sampler` and :func:`resolve_erase`:
the family's defaults, scaled by the number of concepts where a budget is per concept, then
what the user set.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from . import plugins
from .erasure.config import EraseConfig, with_options
from .erasure.pairs import PromptPair
from .pipeline import VARPipeline
from .sampling import SamplerSettings
from .sampling_vq import VQSamplerSettings


@dataclass(frozen=True)
class Family:
    """What a model family declares about itself."""
    name: str
    description: str
    sampler: SamplerSettings
    erase: EraseConfig                     # steps and preserve_per_step are per concept
    pair_kind: str = "object"              # how its concepts expand into prompt pairs by default
    evaluation: str | None = None          # the evaluation plug-in that judges its erasures without a detector
    robust_erase: tuple[tuple[str, object], ...] = ()   # settings robust erasure changes (before the user's)


# The authors' values: sampling cfg 4, tau 0.5, top-p 0.97 (2B); erasure lr 2.3e-5, 500 iterations.
# LoRA, bf16 and gradient checkpointing make a 2B erasure fit a 24 GB GPU (docs/benchmarks.md).
INFINITY = Family(
    "infinity", "Infinity-2B/8B (FoundationVision)",
    sampler=SamplerSettings(cfg=4.0, tau=0.5, top_k=0, top_p=0.97),
    erase=EraseConfig(steps=500, lr=2.3e-5, teacher_cfg=4.0, aux_samples=1, pairs_per_step=2, trainable="lora",
                      lora_rank=4, precision="bf16", gradient_checkpointing=True))

# The authors' README example for Switti-1024: cfg 6 ramped over the scales, guidance off from scale
# 11 of 14 with temperature 0.1 after it, top-k 400, top-p 0.95, Gumbel soft codes from scale 2
# (sampling_vq.VQSamplerSettings). The 512 px model has 10 scales: guidance never switches off
# (the reference does the same with these arguments). Erasure: Infinity's recipe (untuned for Switti:
# no run on the real weights was possible here) with the teacher guided as Switti samples, cfg 6
# ramped over the scales (erasure/run.py: ErasureRun.guidance).
SWITTI = Family(
    "switti", "Switti-1024/512 and Switti-AR (yandex-research)",
    sampler=VQSamplerSettings(),
    erase=replace(INFINITY.erase, teacher_cfg=6.0))

BUILTIN = {INFINITY.name: INFINITY, SWITTI.name: SWITTI}


def family_names() -> list[str]:
    return [*BUILTIN, *(n for n in plugins.names("family") if n not in BUILTIN)]


def get_family(name: str) -> Family:
    family = BUILTIN.get(name) or plugins.get("family", name)
    if family is None:
        raise ValueError(f"unknown model family {name!r} (named by the model file); known: {family_names()}. "
                         "Install the plug-in that provides it")
    return family


def family_of(model: VARPipeline | Family | str) -> Family:
    if isinstance(model, Family):
        return model
    return get_family(model if isinstance(model, str) else model.family)


def count_concepts(pairs: int | Iterable[PromptPair]) -> int:
    """Concepts the pairs name (untagged pairs count as one)."""
    if isinstance(pairs, int):
        return max(1, pairs)
    return max(1, len({p.concept for p in pairs if p.concept}))


def resolve_sampler(model: VARPipeline | Family | str, **options) -> SamplerSettings:
    """The family's sampler settings with the options the user set (None: unset)."""
    return replace(family_of(model).sampler, **{k: v for k, v in options.items() if v is not None})


def resolve_erase(model: VARPipeline | Family | str, concepts: int | Iterable[PromptPair] = 1,
                  **options) -> EraseConfig:
    """The erasure settings of a run: the family's defaults, the per-concept budget, what the user set.

    Per concept: unless ``steps`` is given, erasing n concepts at once runs n times the family's
    iterations; the preservation prompts drawn each step (given or default) are per concept too,
    so each concept keeps its preservation rate. ``options`` may name research knobs; None: unset.
    Robust erasure starts from the family's robust recipe (``Family.robust_erase``) where it has one.
    """
    family, n = family_of(model), count_concepts(concepts)
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("robust", family.erase.robust):
        options = {**dict(family.robust_erase), **options}
    cfg = with_options(family.erase, **options)
    return replace(cfg, steps=cfg.steps if "steps" in options else cfg.steps * n,
                   preserve_per_step=cfg.preserve_per_step * n)
