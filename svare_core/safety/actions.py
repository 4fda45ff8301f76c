"""What to do with a :class:`Detection`: flag, censor, report."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..imageio import ImagesLike, describe, to_uint8_list
from ..visual import font as default_font
from ..visual import wrap
from .base import Detection
from .images import replace_images

__all__ = ["flag", "censor", "censor_image", "report"]


def flag(detection: Detection | np.ndarray | Sequence[float], threshold: float) -> np.ndarray:
    """Boolean array ``[N]``: ``score >= threshold``."""
    scores = detection.scores if isinstance(detection, Detection) else np.asarray(detection, dtype=np.float32)
    return np.asarray(scores, dtype=np.float32).reshape(-1) >= float(threshold)


def censor_image(rgb: np.ndarray, reason: str | None, radius: float | None = None) -> np.ndarray:
    """Strongly blurred copy of one uint8 RGB image with ``reason`` written on it."""
    h, w = rgb.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(rgb))
    r = radius if radius is not None else max(2.0, max(h, w) / 12.0)
    img = img.filter(ImageFilter.GaussianBlur(radius=r))
    if reason:
        draw = ImageDraw.Draw(img)
        font = default_font(max(10, min(h, w) // 20))
        margin = max(2, min(h, w) // 32)
        lines = wrap(reason, font, max(1, w - 4 * margin), draw)
        boxes = [draw.textbbox((0, 0), ln, font=font) for ln in lines]
        line_h = max((b[3] - b[1] for b in boxes), default=0) + margin // 2 + 1
        block_h = line_h * len(lines)
        block_w = max((b[2] - b[0] for b in boxes), default=0)
        x0 = max(0, (w - block_w) // 2)
        y0 = max(0, (h - block_h) // 2)
        draw.rectangle(
            (max(0, x0 - margin), max(0, y0 - margin),
             min(w - 1, x0 + block_w + margin), min(h - 1, y0 + block_h + margin)),
            fill=(0, 0, 0),
        )
        for k, ln in enumerate(lines):
            draw.text((x0, y0 + k * line_h), ln, fill=(255, 255, 255), font=font)
    return np.asarray(img, dtype=np.uint8)


def censor(
    images: ImagesLike,
    flagged: np.ndarray | Sequence[bool],
    reasons: str | Sequence[str | None] | None = None,
    radius: float | None = None,
) -> ImagesLike:
    """Replace flagged images by a blurred version with the reason drawn on.

    Returns the caller's layout (torch ``[B,H,W,C]`` float stays float on the
    same device, uint8 numpy stays uint8, PIL stays PIL). Unflagged images are
    left exactly as they were. ``reasons``: one string for all, or one per image.
    Blur radius defaults to ``max(H, W) / 12``.
    """
    layout = describe(images)
    flagged = np.asarray(flagged, dtype=bool).reshape(-1)
    if len(flagged) != layout.count:
        raise ValueError(f"flagged has {len(flagged)} entries for {layout.count} images")
    if reasons is None or isinstance(reasons, str):
        reasons = [reasons] * layout.count
    reasons = list(reasons)
    if len(reasons) != layout.count:
        raise ValueError(f"reasons has {len(reasons)} entries for {layout.count} images")
    if not flagged.any():
        return images
    rgb = to_uint8_list(images)
    repl = {int(i): censor_image(rgb[i], reasons[i], radius) for i in np.flatnonzero(flagged)}
    return replace_images(images, repl)


def reasons_for(detection: Detection, threshold: float, concept: str | None = None) -> list[str]:
    """One short text per image, e.g. ``"censored: nudenet nudity 0.87 (FEMALE_BREAST_EXPOSED)"``."""
    concept = concept if concept is not None else detection.concept
    what = concept or "flagged content"
    out = []
    for s, d in zip(detection.scores, detection.details):
        extra = d.get("top_class") if isinstance(d, dict) else None
        txt = f"censored: {detection.detector or 'detector'} {what} {float(s):.2f} >= {threshold:.2f}"
        out.append(txt + (f" ({extra})" if extra else ""))
    return out


def report(detection: Detection, threshold: float, concept: str | None = None) -> str:
    """Human-readable multi-line summary of a detection run."""
    concept = concept if concept is not None else detection.concept
    flags = flag(detection, threshold)
    n = len(detection)
    head = (
        f"Safety check: detector={detection.detector or '?'}, concept={concept or '(default)'}, "
        f"threshold={threshold:.2f}: {int(flags.sum())} of {n} image(s) flagged"
    )
    if n:
        s = detection.scores
        head += f" (scores min {s.min():.3f} / mean {s.mean():.3f} / max {s.max():.3f})"
    lines = [head]
    for i in range(n):
        mark = "FLAGGED" if flags[i] else "ok"
        labels = ", ".join(detection.labels[i]) if detection.labels[i] else "-"
        lines.append(f"  #{i}: score {detection.scores[i]:.3f}  {mark:7s}  labels: {labels}")
    return "\n".join(lines)
