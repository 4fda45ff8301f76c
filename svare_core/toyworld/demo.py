"""The main job on the toy world: erase a concept, draw a before/after grid, write the report.

The grid's last row is an attack: a soft prompt (erasure/attacks.py) optimised against the erased
model to bring the concept back on the first concept prompt, drawn by both models."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..erasure import ErasurePatch, PromptPair, apply_patch, expand_concept
from ..erasure.attacks import AttackBudget, Judge, concept_targets, draw_conditions, soft_prompt
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
             seed: int = 0, started: float | None = None, attack_steps: int = 60) -> str:
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
    attack, attacked = _soft_prompt_attack(base, erased, concept, prompts[:4], settings, attack_steps, grid_seeds, seed)
    rows = []
    for model, attack_row in tqdm(list(zip([base, erased], attacked)), desc="grid", unit="model"):
        res = generate(model, [p for p in prompts for _ in range(grid_seeds)], seed=seed, settings=settings)
        rows.append(torch.cat([res.images, attack_row]))
    labels = prompts + [f"attack: soft prompt for '{prompts[0]}'"]
    cells = [[rows[m][i * grid_seeds + s] for m in range(2) for s in range(grid_seeds)] for i in range(len(labels))]
    cols = [f"{name} #{s}" for name in ("before", "after") for s in range(grid_seeds)]
    labelled_grid(cells, labels, cols).save(out / "before_after.png")
    report = evaluate_toy(base, erased, [concept], seeds=seeds, settings=settings)
    report["soft_prompt_attack"] = attack
    report["train_seconds"] = round(result.seconds, 1)
    report["total_seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    c = report["concepts"][concept]
    return (f"\nerased '{concept}' -> '{anchor}' in {result.seconds:.0f} s (total {report['total_seconds']:.0f} s)\n"
            f"  erasure rate {c['erasure_rate']:.1%} (base model: {c['base_absent_rate']:.1%} absent), "
            f"paraphrases {c['paraphrase_erasure_rate']:.1%}\n"
            f"  preservation: concept prompts {c['preservation_on_concept_prompts']:.1%}, "
            f"unrelated prompts {report['unrelated']['preservation_unrelated']:.1%}\n"
            f"  soft-prompt attack ({attack['steps']} steps): the concept back in {attack['erased']:.0%} of the erased "
            f"model's images (base model: {attack['base']:.0%})\n"
            f"wrote {out / 'before_after.png'}, {out / 'report.json'}, {out / f'erase_{concept}.safetensors'}")


def _soft_prompt_attack(base: VARPipeline, erased: VARPipeline, concept: str, prompts: list[str],
                        settings: SamplerSettings, steps: int, grid_seeds: int, seed: int):
    """The soft-prompt attack on ``prompts`` against the erased model: its report (share of images showing
    the concept, seeds from 5000, on both models) and the grid row (the first prompt's attack, drawn
    by the base and the erased model with the grid's seeds)."""
    scales = erased.default_scales()
    budget = AttackBudget(soft_steps=steps, judge_seeds=2)
    targets = concept_targets(base, prompts, budget.target_images, settings, scales, seed=10**5)
    feats, info = soft_prompt(erased, concept, targets, budget, scales, settings.cfg_at(0, len(scales)))
    judge = Judge("toyworld", concept)
    rates = {name: float(judge(draw_conditions(model, feats, budget.judge_seeds, 5000, settings)).mean())
             for name, model in (("erased", erased), ("base", base))}
    row = [draw_conditions(model, feats[:1], grid_seeds, seed, settings) for model in (base, erased)]
    return {**info, **rates, "prompts": prompts, "num_images": len(feats) * budget.judge_seeds}, row
