"""The main job on the toy world: erase a concept, draw a before/after grid, write the report."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..erasure import ErasurePatch, PromptPair, apply_patch, expand_concept
from ..erasure.config import EraseConfig
from ..erasure.pairs import preserve_prompts_for
from ..pipeline import VARPipeline
from ..sampling import SamplerSettings, generate
from ..visual import labelled_grid
from . import world
from .evaluate import evaluate_toy

Train = Callable[[VARPipeline, list[PromptPair], EraseConfig, list[str], str], object]


def grid_prompts(concept: str, anchor: str) -> list[str]:
    """The concept with four values of another attribute, the anchor, and an unrelated prompt."""
    attr = next(a for a, vs in world.VALUES.items() if concept in vs)
    other = "shape" if attr != "shape" else "colour"
    prompts = [world.full_caption(**{attr: concept, other: v}) for v in world.VALUES[other][:4]]
    return prompts + [world.full_caption(**{attr: anchor, other: world.VALUES[other][0]}),
                      world.full_caption(shape="heart" if concept != "heart" else "square",
                                         colour="green" if concept != "green" else "white")]


def output_files(out: Path, concept: str) -> list[Path]:
    """What a demo run writes into ``out``."""
    return [out / f"erase_{concept}.safetensors", out / "before_after.png", out / "report.json"]


def run_demo(base: VARPipeline, cfg: EraseConfig, settings: SamplerSettings, train: Train, *, concept: str,
             anchor: str, out: str | Path, preserve: list[str] | None = None, seeds: int = 4, grid_seeds: int = 3,
             seed: int = 0, started: float | None = None) -> str:
    """Erase ``concept`` (drawing ``anchor`` instead) with ``train``; write the patch, before_after.png
    and report.json into ``out``; return the summary to print. ``started``: when the job began
    (time.time(); default now), for the total time the report records."""
    t0 = time.time() if started is None else started
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = expand_concept(concept, anchor, "toy")
    result = train(base, pairs, cfg, preserve_prompts_for(pairs, "toy", preserve), f"erasing '{concept}'")
    patch: ErasurePatch = result.patch
    patch.save(output_files(out, concept)[0])
    erased = apply_patch(base, patch)
    prompts = grid_prompts(concept, anchor)
    rows = []
    for model in tqdm([base, erased], desc="grid", unit="model"):
        res = generate(model, [p for p in prompts for _ in range(grid_seeds)], seed=seed, settings=settings)
        rows.append(res.images)
    cells = [[rows[m][i * grid_seeds + s] for m in range(2) for s in range(grid_seeds)] for i in range(len(prompts))]
    cols = [f"{name} #{s}" for name in ("before", "after") for s in range(grid_seeds)]
    labelled_grid(cells, prompts, cols).save(out / "before_after.png")
    report = evaluate_toy(base, erased, [concept], seeds=seeds, settings=settings)
    report["train_seconds"] = round(result.seconds, 1)
    report["total_seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    c = report["concepts"][concept]
    return (f"\nerased '{concept}' -> '{anchor}' in {result.seconds:.0f} s (total {report['total_seconds']:.0f} s)\n"
            f"  erasure rate {c['erasure_rate']:.1%} (base model: {c['base_absent_rate']:.1%} absent), "
            f"paraphrases {c['paraphrase_erasure_rate']:.1%}\n"
            f"  preservation: concept prompts {c['preservation_on_concept_prompts']:.1%}, "
            f"unrelated prompts {report['unrelated']['preservation_unrelated']:.1%}\n"
            f"wrote {out / 'before_after.png'}, {out / 'report.json'}, {out / f'erase_{concept}.safetensors'}")
