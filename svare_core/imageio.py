"""Image layout conversions, one implementation for the whole package (numpy, torch and PIL only).

Accepted inputs (``ImagesLike``):

* ComfyUI ``IMAGE``: a ``torch.Tensor`` ``[B, H, W, C]`` float in 0..1 (a single
  ``[H, W, C]`` tensor is accepted too; a ``uint8`` tensor is read as 0..255);
* a ``PIL.Image.Image`` or a list/tuple of them (sizes may differ);
* a numpy array ``[B, H, W, C]`` or ``[H, W, C]``: ``uint8`` in 0..255 or float in 0..1
  (other integer types are read as 0..255).

``C`` may be 3 (RGB), 4 (RGBA: alpha is dropped) or 1 (grey).

Everything is first turned into a list of ``uint8`` RGB arrays ``[H, W, 3]``
(:func:`to_uint8_list`); :func:`to_uint8_batch`, :func:`to_pil_list`, :func:`to_bgr_list`
and :func:`to_pil` (one image) build on it.  torch is imported only when a tensor is
passed, so low-level modules (the toy-world oracle) can use this freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is only imported when a tensor is actually passed
    import torch

ImagesLike = Union["torch.Tensor", np.ndarray, Image.Image, Sequence[Image.Image]]

__all__ = [
    "ImagesLike",
    "Layout",
    "as_array",
    "describe",
    "float_to_uint8",
    "array_to_uint8",
    "hwc_to_rgb",
    "to_uint8_list",
    "to_uint8_batch",
    "to_pil_list",
    "to_pil",
    "to_bgr_list",
]


def is_torch_tensor(x: Any) -> bool:
    # Avoid importing torch just to find out that the input is not a tensor.
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach") and hasattr(x, "shape")


def _torch():
    import torch

    return torch


def as_array(x: Any) -> np.ndarray:
    """numpy view of an array or tensor (detached, on the CPU; bf16/fp16 become float32)."""
    if is_torch_tensor(x):
        t = x.detach()
        if t.dtype.is_floating_point and t.dtype not in (_torch().float32, _torch().float64):
            t = t.float()  # bf16 has no numpy equivalent; fp16 loses nothing by this
        return t.cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class Layout:
    """How the caller's images were laid out, so results can be returned alike."""

    kind: str  # "torch" | "numpy" | "pil" | "pil_list"
    batched: bool  # False for a single [H, W, C] array/tensor or a single PIL image
    dtype: Any = None  # numpy/torch dtype of array inputs
    channels: int = 3
    count: int = 0


def float_to_uint8(x: np.ndarray) -> np.ndarray:
    """0..1 floats -> uint8 0..255 with rounding (exact inverse of ``u8 / 255``); NaN -> 0."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 as is, bool -> 0/255, floats 0..1 -> 0..255, other integers clipped to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        return float_to_uint8(arr)
    if np.issubdtype(arr.dtype, np.integer):
        # Integers other than uint8 are taken as already being 0..255.
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise TypeError(f"unsupported image dtype {arr.dtype}")


def hwc_to_rgb(arr: np.ndarray) -> np.ndarray:
    """[H, W, C] (or [H, W] grey) uint8 -> contiguous [H, W, 3] uint8 RGB."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {arr.shape}")
    c = arr.shape[-1]
    if c == 3:
        out = arr
    elif c == 4:
        out = arr[..., :3]
    elif c == 1:
        out = np.repeat(arr, 3, axis=-1)
    else:
        raise ValueError(
            f"expected 1, 3 or 4 channels in the last axis (channels-last, as ComfyUI's "
            f"IMAGE), got shape {arr.shape}"
        )
    return np.ascontiguousarray(out)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def describe(images: ImagesLike) -> Layout:
    """Return the :class:`Layout` of ``images`` (raises on unsupported input)."""
    if isinstance(images, Image.Image):
        return Layout("pil", batched=False, channels=len(images.getbands()), count=1)
    if isinstance(images, (list, tuple)):
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must contain PIL images only")
        return Layout("pil_list", batched=True, count=len(images))
    if is_torch_tensor(images):
        kind, shape = "torch", tuple(images.shape)
    elif isinstance(images, np.ndarray):
        kind, shape = "numpy", images.shape
    else:
        raise TypeError(
            "images must be a torch tensor [B,H,W,C] (ComfyUI IMAGE), a numpy array, "
            f"a PIL image or a list of PIL images; got {type(images).__name__}"
        )
    if len(shape) not in (3, 4):
        what = "tensor" if kind == "torch" else "array"
        raise ValueError(f"expected a [B, H, W, C] or [H, W, C] {what}, got {shape}")
    batched = len(shape) == 4
    return Layout(kind, batched=batched, dtype=images.dtype, channels=int(shape[-1]),
                  count=int(shape[0]) if batched else 1)


def finite_images(images: ImagesLike) -> np.ndarray:
    """bool ``[N]``: which images hold only finite values (NaN or infinite pixels become 0 or 255 when
    converted, which would hide that the image is broken). PIL and integer images are always finite."""
    layout = describe(images)
    if layout.kind in ("pil", "pil_list"):
        return np.ones(layout.count, dtype=bool)
    arr = as_array(images)
    if not np.issubdtype(arr.dtype, np.floating):
        return np.ones(layout.count, dtype=bool)
    arr = arr if layout.batched else arr[None]
    return np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)


def to_uint8_list(images: ImagesLike) -> list[np.ndarray]:
    """Any accepted input -> list of contiguous ``uint8`` RGB arrays ``[H, W, 3]``."""
    layout = describe(images)
    if layout.kind == "pil":
        return [_pil_to_rgb(images)]
    if layout.kind == "pil_list":
        return [_pil_to_rgb(im) for im in images]
    arr = as_array(images)
    if not layout.batched:
        arr = arr[None]
    arr = array_to_uint8(arr)
    return [hwc_to_rgb(a) for a in arr]


def to_uint8_batch(images: ImagesLike) -> np.ndarray:
    """``uint8`` RGB batch ``[B, H, W, 3]``; all images must share one size."""
    imgs = to_uint8_list(images)
    if not imgs:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; use to_uint8_list")
    return np.stack(imgs)


def to_pil_list(images: ImagesLike) -> list[Image.Image]:
    """List of RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8_list(images)]


def to_pil(image: Any) -> Image.Image:
    """One image -> RGB PIL image: a PIL image, or an [H, W, C] / [1, H, W, C] / [H, W] array or tensor."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = as_array(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    return Image.fromarray(hwc_to_rgb(array_to_uint8(a)), "RGB")


def to_bgr_list(images: ImagesLike) -> list[np.ndarray]:
    """List of contiguous ``uint8`` **BGR** arrays ``[H, W, 3]`` (OpenCV / NudeNet order)."""
    return [np.ascontiguousarray(a[..., ::-1]) for a in to_uint8_list(images)]
