"""svare_core.visual: grids with labels, loss curves, ComfyUI image layout."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from svare_core import visual


def colours(img: Image.Image) -> set:
    return set(map(tuple, np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()))


def test_to_pil_accepts_tensors_arrays_and_batches():
    t = torch.zeros(8, 6, 3)
    t[0, 0] = 1.0
    img = visual.to_pil(t)
    assert img.size == (6, 8) and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (0, 0, 0)
    assert visual.to_pil(np.full((4, 4, 3), 7, np.uint8)).getpixel((2, 2)) == (7, 7, 7)
    assert visual.to_pil(torch.rand(1, 5, 5, 3)).size == (5, 5)
    assert visual.to_pil(np.full((3, 3, 4), 2.0)).getpixel((0, 0)) == (255, 255, 255)   # clipped, alpha dropped


def test_comfy_image_round_trip():
    a = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    t = visual.to_comfy_image(Image.fromarray(a))
    assert t.shape == (1, 4, 5, 3) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(np.asarray(visual.to_pil(t[0])), a)


def test_upscale_is_nearest_and_integer():
    small = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))   # 2x1
    big = visual.upscale(small, 192)
    assert big.size == (384, 192) and colours(big) == {(255, 0, 0), (0, 0, 255)}
    assert visual.upscale(Image.new("RGB", (300, 300)), 192).size == (300, 300)


def test_labelled_grid_layout():
    rows = [[torch.rand(64, 64, 3), torch.rand(64, 64, 3)] for _ in range(3)]
    grid = visual.labelled_grid(rows, row_labels=["a very long prompt " * 6, "b", "c"], col_labels=["before", "after"])
    assert grid.mode == "RGB" and grid.height >= 3 * 192 and grid.width >= 2 * 192 + 200
    plain = visual.labelled_grid(rows)
    assert plain.width < grid.width and plain.height < grid.height
    # the images are pasted unchanged (enlarged 3x with NEAREST)
    a = np.asarray(plain)
    first = (np.clip(rows[0][0].numpy(), 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(a[6:6 + 192:3, 6:6 + 192:3], first)


def test_loss_curve_plots_losses_only():
    hist = [{"step": i + 1, "erase": 1 / (i + 1), "preserve": 0.01 * (i + 1), "kept_tokens": 100} for i in range(30)]
    assert visual._loss_keys(hist) == ["erase", "preserve"]
    img = visual.loss_curve(hist, size=(400, 250))
    assert img.size == (400, 250) and len(colours(img)) > 5
    seen = colours(img)
    assert visual.LINE_COLOURS[0] in seen and visual.LINE_COLOURS[1] in seen
    one = visual.loss_curve(hist, keys=["erase"])
    assert visual.LINE_COLOURS[1] not in colours(one)


def test_loss_curve_edge_cases():
    assert visual.loss_curve([]).size == (640, 360)
    assert visual.loss_curve([{"step": 1, "erase": 0.5}]).size == (640, 360)
    flat = visual.loss_curve([{"step": i, "erase": 0.3} for i in range(5)])
    assert visual.LINE_COLOURS[0] in colours(flat)
    nan = visual.loss_curve([{"step": 1, "esd": math.nan}, {"step": 2, "esd": 1.0}, {"step": 3, "esd": math.inf}])
    assert nan.size == (640, 360)
    wide = visual.loss_curve([{"step": i, "kl": 10.0 ** -i} for i in range(6)])           # log axis chosen
    assert wide.size == (640, 360)
    assert visual.loss_curve([{"step": i, "x": v} for i, v in enumerate([-1.0, 0.0, 2.0])], log_y=True).size
