"""Scale schedules: the (h, w) latent grid of every scale, per aspect ratio and resolution.

Infinity predicts an image coarse-to-fine; a schedule lists the grids. The table for the real
models ships as data (``data/scale_schedules.json``); small models carry their own schedule in
their config.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

Schedule = list[tuple[int, int]]

_TABLE = Path(__file__).parent / "data" / "scale_schedules.json"


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(_TABLE.read_text())


def presets() -> dict[str, int]:
    """Resolution preset name -> number of scales (``"1M"`` -> 13)."""
    return dict(_table()["preset_num_scales"])


def aspect_ratios() -> list[str]:
    """Supported aspect ratios as "h:w" strings, both orientations."""
    ratios = []
    for key in _table()["ratio_to_hw"]:
        r = float(key)
        ratios.append(_ratio_name(r))
        if r != 1.0:
            ratios.append(_ratio_name(1 / r))
    return ratios


def _ratio_name(r: float) -> str:
    for h in range(1, 9):
        w = h / r
        if abs(w - round(w)) < 0.02:
            return f"{h}:{round(w)}"
    return f"{r:.3f}"


def infinity_schedule(aspect_ratio: str = "1:1", preset: str = "1M") -> Schedule:
    """The official Infinity schedule for an aspect ratio "h:w" and a resolution preset.

    The VAE stride is 16, so the image is ``16 * last grid`` pixels.
    """
    table = _table()
    if preset not in table["preset_num_scales"]:
        raise ValueError(f"unknown resolution preset {preset!r}; choose one of {sorted(table['preset_num_scales'])}")
    try:
        h, w = (float(v) for v in aspect_ratio.split(":"))
    except ValueError:
        raise ValueError(f"aspect ratio {aspect_ratio!r} must look like '16:9' or '1:1'") from None
    ratio, swap = (h / w, False) if h >= w else (w / h, True)
    key = min(table["ratio_to_hw"], key=lambda k: abs(float(k) - ratio))
    if abs(float(key) - ratio) > 0.02:
        raise ValueError(f"aspect ratio {aspect_ratio!r} is not in Infinity's table; choose one of {aspect_ratios()}")
    grids = table["ratio_to_hw"][key][: table["preset_num_scales"][preset]]
    return [(b, a) if swap else (a, b) for a, b in grids]


def num_tokens(schedule: Schedule) -> int:
    return sum(h * w for h, w in schedule)


def reference_grid(scales: Schedule, default: tuple[int, int]) -> tuple[int, int]:
    """The grid RoPE positions are measured on: the 1M grid of the official schedule that
    ``scales`` starts like (so 256 px and 1024 px images share one coordinate frame), else ``default``."""
    scales = [tuple(s) for s in scales]
    for grids in _table()["ratio_to_hw"].values():
        for swap in (False, True):
            full = [(b, a) if swap else (a, b) for a, b in grids]
            if full[: len(scales)] == scales:
                return full[-1]
    return tuple(default)


# Switti's square schedules (side of each scale in tokens, stride 16), keyed by their scale count:
# the 512 px model has 10 scales (2,240 tokens), the 1024 px model 14 (9,451 tokens).
SWITTI_SIDES = {10: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), 14: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)}
SWITTI_RESOLUTIONS = {512: 10, 1024: 14}


def switti_schedule(num_scales: int = 14) -> Schedule:
    """Switti's schedule with ``num_scales`` scales (10: 512 px, 14: 1024 px); other counts: the
    first ``num_scales`` scales of the 1024 px one (tiny test models)."""
    sides = SWITTI_SIDES.get(num_scales) or SWITTI_SIDES[14][:num_scales]
    if len(sides) != num_scales or num_scales < 1:
        raise ValueError(f"Switti has schedules of 10 (512 px) or 14 (1024 px) scales, not {num_scales}")
    return [(s, s) for s in sides]
