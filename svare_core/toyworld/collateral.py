"""Collateral where users see it: what an erasure does to the attributes a prompt leaves open.

"a red circle" says nothing of the style or the background; the base model fills them in with
its own distribution, and an erasure that redraws red as blue should leave that distribution as
the base model draws it for "a blue circle" (the anchor). Accuracy on the prompted attributes
misses this collateral (every erased circle may come out striped on gray and still be a circle).

Each distance is a total-variation distance between two pools of oracle readings of the same
size, drawn with different seeds; its noise floor is the same distance between the reference
model's own readings on two such seed ranges, so a distance near its floor is sampling noise.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..erasure.evaluate import PromptSpec
from . import world

# The second seed range of the noise floor and of the distances (far from any evaluation's first seed).
OTHER_SEEDS = 10**6


def open_values(readings: list[dict], specs: list[PromptSpec], seeds: int, skip: frozenset = frozenset()
                ) -> dict[str, list[str]]:
    """attribute -> the values read where the prompt left that attribute open (``skip``: attributes
    not counted, such as the erased concept's own)."""
    out: dict[str, list[str]] = {a: [] for a in world.ATTRIBUTES if a not in skip}
    for k, reading in enumerate(readings):
        wanted = specs[k // seeds].wanted
        for attr in out:
            if attr not in wanted:
                out[attr].append(reading[attr])
    return {a: v for a, v in out.items() if v}


def total_variation(a: list[str], b: list[str]) -> float:
    """Total-variation distance between the empirical distributions of two lists of labels."""
    if not a or not b:
        return 0.0
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[v] / len(a) - cb[v] / len(b)) for v in set(ca) | set(cb))


def open_attribute_distance(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict:
    """Per open attribute and overall (weighted by how many readings each attribute has)."""
    per = {attr: total_variation(a[attr], b.get(attr, [])) for attr in a}
    weights = {attr: len(a[attr]) for attr in per}
    overall = sum(per[x] * weights[x] for x in per) / max(sum(weights.values()), 1)
    return {"overall": overall, "per_attribute": per}


def scene_agreement(a: list[dict], b: list[dict]) -> float:
    """Share of same-seed image pairs whose whole scene (every attribute) the oracle reads alike."""
    same = [all(x[attr] == y[attr] for attr in world.ATTRIBUTES) for x, y in zip(a, b)]
    return float(np.mean(same)) if same else 1.0


def distance_report(measured: dict[str, list[str]], reference: dict[str, list[str]],
                    reference_other: dict[str, list[str]]) -> dict:
    """``measured`` (seed range 1) against ``reference`` on the other seed range, and the floor:
    ``reference_other`` (seed range 1) against the same."""
    distance = open_attribute_distance(measured, reference)
    floor = open_attribute_distance(reference_other, reference)
    return {"tv_distance": distance["overall"], "tv_noise_floor": floor["overall"],
            "tv_ratio_to_floor": distance["overall"] / max(floor["overall"], 1e-9),
            "tv_per_attribute": {k: round(v, 4) for k, v in distance["per_attribute"].items()},
            "tv_floor_per_attribute": {k: round(v, 4) for k, v in floor["per_attribute"].items()}}
