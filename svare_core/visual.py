"""Pictures for people: labelled image grids and loss curves (PIL only), ComfyUI image layout.

    grid = labelled_grid([[before, after] for before, after in rows], row_labels=prompts,
                         col_labels=["before", "after"])
    plot = loss_curve(result.history)           # one line per loss key
    tensor = to_comfy_image(grid)                # (1, H, W, 3) float32 in 0..1
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .imageio import to_pil

BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
MUTED = (140, 140, 140)
LINE_COLOURS = [(255, 120, 80), (90, 170, 255), (120, 220, 120), (230, 200, 80), (200, 130, 255), (120, 220, 220)]
SKIP_KEYS = ("step", "kept_tokens")   # history entries that are not losses


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px (a fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)   # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def to_comfy_image(pil: Image.Image) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE (1, H, W, 3) float32 in 0..1."""
    a = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy())[None]


def upscale(img: Image.Image, min_size: int = 192) -> Image.Image:
    """Enlarge small images by an integer factor with NEAREST so their pixels stay crisp."""
    k = max(1, math.ceil(min_size / max(1, min(img.size))))
    return img if k == 1 else img.resize((img.width * k, img.height * k), Image.NEAREST)


def wrap(text: str, fnt, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` px wide (a longer single word stays whole)."""
    lines = []
    for para in str(text).splitlines() or [""]:
        line = ""
        for word in para.split():
            cand = f"{line} {word}".strip()
            if line and draw.textlength(cand, font=fnt) > width:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return lines


def labelled_grid(images: Sequence[Sequence], row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, *, min_size: int = 192, gap: int = 6,
                  label_width: int = 200, font_size: int = 15) -> Image.Image:
    """A grid of images (rows of (H, W, 3) arrays/tensors/PIL images) with row and column labels.

    Images smaller than ``min_size`` are enlarged with NEAREST; every cell gets the size of the
    largest image.
    """
    rows = [[upscale(to_pil(im), min_size) for im in row] for row in images]
    if not rows or not any(rows):
        raise ValueError("labelled_grid needs at least one image")
    ncols = max(len(r) for r in rows)
    cw, ch = max(im.width for r in rows for im in r), max(im.height for r in rows for im in r)
    fnt = font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 4
    left = label_width if row_labels else 0
    top = line_h + 2 * gap if col_labels else 0
    W = left + ncols * (cw + gap) + gap
    H = top + len(rows) * (ch + gap) + gap
    out = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(col_labels or []):
        x = left + gap + j * (cw + gap)
        tw = draw.textlength(str(label), font=fnt)
        draw.text((x + (cw - tw) / 2, gap), str(label), fill=TEXT, font=fnt)
    for i, row in enumerate(rows):
        y = top + gap + i * (ch + gap)
        if row_labels and i < len(row_labels):
            lines = wrap(row_labels[i], fnt, label_width - 2 * gap, measure)[: max(1, ch // line_h)]
            y0 = y + (ch - line_h * len(lines)) / 2
            for k, line in enumerate(lines):
                draw.text((gap, y0 + k * line_h), line, fill=TEXT, font=fnt)
        for j, im in enumerate(row):
            x = left + gap + j * (cw + gap)
            out.paste(im, (x + (cw - im.width) // 2, y + (ch - im.height) // 2))
    return out


def _loss_keys(history: Sequence[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for rec in history:
        for k, v in rec.items():
            if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def _nice(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def loss_curve(history: Sequence[dict], keys: Sequence[str] | None = None, *, size: tuple[int, int] = (640, 360),
               title: str = "loss", log_y: bool | None = None) -> Image.Image:
    """Plot every loss of a training history (a list of {"step": n, key: value}) against its step.

    ``log_y`` None: a log axis when all values are positive and span more than 50x.
    Non-finite values are skipped. An empty history gives an empty plot with its title.
    """
    keys = list(keys) if keys is not None else _loss_keys(history)
    series = {}
    for k in keys:
        pts = [(rec.get("step", i + 1), float(rec[k])) for i, rec in enumerate(history)
               if isinstance(rec.get(k), (int, float)) and math.isfinite(float(rec[k]))]
        if pts:
            series[k] = pts
    values = [v for pts in series.values() for _, v in pts]
    if log_y is None:
        log_y = bool(values) and min(values) > 0 and max(values) / min(values) > 50
    if log_y and values and min(values) <= 0:
        log_y = False
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)

    W, H = size
    out = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(out)
    fnt, small = font(16), font(12)
    latest = ", ".join(f"{k} {pts[-1][1]:.4g}" for k, pts in series.items())
    draw.text((10, 8), f"{title}: {latest}" if latest else f"{title}: no values yet", fill=TEXT, font=fnt)
    x0, y0, x1, y1 = 62, 36, W - 14, H - 34              # plot area
    draw.rectangle((x0, y0, x1, y1), outline=MUTED)
    if not series:
        return out
    steps = [s for pts in series.values() for s, _ in pts]
    smin, smax = min(steps), max(steps)
    vmin, vmax = min(fy(v) for v in values), max(fy(v) for v in values)
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 0.5 * (abs(vmin) or 1), vmax + 0.5 * (abs(vmax) or 1)
    pad = 0.05 * (vmax - vmin)
    vmin, vmax = vmin - pad, vmax + pad

    def xy(s, v):
        x = x0 + (x1 - x0) * ((s - smin) / (smax - smin) if smax > smin else 0.5)
        return x, y1 - (y1 - y0) * (fy(v) - vmin) / (vmax - vmin)

    for t in range(5):                                      # y ticks with grid lines
        f = vmin + (vmax - vmin) * t / 4
        y = y1 - (y1 - y0) * t / 4
        draw.line((x0, y, x1, y), fill=(48, 48, 48))
        draw.text((4, y - 7), _nice(10 ** f if log_y else f), fill=MUTED, font=small)
    for t in range(5):                                      # x ticks (steps)
        s = smin + (smax - smin) * t / 4
        x = x0 + (x1 - x0) * t / 4
        draw.line((x, y1, x, y1 + 4), fill=MUTED)
        draw.text((x - 10, y1 + 6), f"{s:.0f}", fill=MUTED, font=small)
    draw.text(((x0 + x1) / 2 - 14, H - 16), "step" + ("   (log y)" if log_y else ""), fill=MUTED, font=small)
    for n, (k, pts) in enumerate(series.items()):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        line = [xy(s, v) for s, v in pts]
        if len(line) == 1:
            x, y = line[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        else:
            draw.line(line, fill=colour, width=2)
        lx = x1 - 130
        ly = y0 + 8 + 18 * n
        draw.line((lx, ly + 7, lx + 18, ly + 7), fill=colour, width=3)
        draw.text((lx + 24, ly), k, fill=TEXT, font=small)
    return out


def save_png(image, path, text: dict[str, str] | None = None) -> None:
    """Write an (H, W, 3) image as PNG with text chunks (prompt, seed) so the file says how it was made."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, str(v))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:                                      # atomic: an interrupted run never leaves half a PNG
        to_pil(image).save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
