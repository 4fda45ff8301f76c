"""The toy world's safety detector: its analytic oracle as a detector (registered by the plug-in).

The concept is an attribute value of the toy world (``"red"``, ``"star"``,
``"striped"``, ``"gray"``, ...), optionally qualified as ``"colour=red"``; the
paraphrases of ``svare_core.toyworld.world.SYNONYMS`` (``"crimson"``) map to
their value. The score of an image is the oracle's soft score for that value
(the oracle's per-attribute scores sum to 1 over the attribute's values).
Labels are the oracle's most likely value of every attribute.

Images that are not ``IMAGE_SIZE`` (64 px) square are resized first (box filter, as the
oracle itself does). An image where the oracle finds no shape has uniform
shape/colour/style scores and the label ``"none"`` for those attributes.
No optional dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..imageio import ImagesLike, to_uint8_list
from ..safety.base import Detection, normalise_concept
from . import oracle, world


def parse_concept(concept: str, values: dict[str, tuple[str, ...]], synonyms: dict[str, list[str]]) -> tuple[str, str]:
    """``"red"`` / ``"colour=red"`` / ``"crimson"`` -> ``("colour", "red")``."""
    c = concept.strip().lower()
    attr = None
    for sep in ("=", ":"):
        if sep in c:
            attr, c = (s.strip() for s in c.split(sep, 1))
            if attr == "color":
                attr = "colour"
            if attr not in values:
                raise ValueError(f"unknown toy-world attribute {attr!r}; attributes: {', '.join(values)}")
            break
    if c.startswith("a "):
        c = c[2:].strip()
    syn = {s.lower(): v for v, ss in synonyms.items() for s in ss}
    value = c if any(c in vs for vs in values.values()) else syn.get(c, c)
    hits = [a for a, vs in values.items() if value in vs and (attr is None or a == attr)]
    if not hits:
        known = "; ".join(f"{a}: {', '.join(vs)}" for a, vs in values.items())
        raise ValueError(f"{concept!r} is not a toy-world attribute value ({known})")
    if len(hits) > 1:
        raise ValueError(f"{concept!r} is ambiguous ({', '.join(hits)}); write it as attribute=value")
    return hits[0], value


class ToyWorldDetector:
    """``get_detector("toyworld", **oracle_options)``; options go to ``Oracle(...)``."""

    name = "toyworld"

    def __init__(self, **oracle_options: Any) -> None:
        self._world = world
        self._oracle = oracle.Oracle(**oracle_options)
        self.values: dict[str, tuple[str, ...]] = dict(world.VALUES)
        self.size = int(getattr(world, "IMAGE_SIZE", 64))
        self._fit_size = oracle.fit_size

    def _batch(self, images: ImagesLike) -> np.ndarray:
        return self._fit_size(to_uint8_list(images))

    def detect(self, images: ImagesLike, concept: str | None = None) -> Detection:
        c = normalise_concept(concept)
        if c is None:
            raise ValueError("the toyworld detector needs a concept, e.g. 'red', 'star' or 'colour=red'")
        attr, value = parse_concept(c, self.values, getattr(self._world, "SYNONYMS", {}))
        batch = self._batch(images)
        n = len(batch)
        if n == 0:
            return Detection(np.zeros(0), [], [], detector=self.name, concept=c)
        soft = {a: np.asarray(s, dtype=np.float64) for a, s in self._oracle.scores(batch).items()}
        col = self.values[attr].index(value)
        scores = soft[attr][:, col]
        labels: list[list[str]] = []
        details: list[dict[str, Any]] = []
        for i in range(n):
            read = {}
            for a in self.values:
                if a not in soft:
                    continue
                row = soft[a][i]
                # the oracle gives uniform scores (and reads "none") when nothing is drawn
                read[a] = "none" if np.ptp(row) < 1e-9 else self.values[a][int(np.argmax(row))]
            labels.append(list(read.values()))
            details.append({"attribute": attr, "value": value, "read": read})
        return Detection(np.clip(scores, 0.0, 1.0), labels, details, detector=self.name, concept=c)
