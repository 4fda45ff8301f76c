"""Image layout conversions shared by every safety backend.

Accepted inputs (``ImagesLike``):

* ComfyUI ``IMAGE``: a ``torch.Tensor`` ``[B, H, W, C]`` float in 0..1 (a single
  ``[H, W, C]`` tensor is accepted too; a ``uint8`` tensor is read as 0..255);
* a ``PIL.Image.Image`` or a list/tuple of them (sizes may differ);
* a numpy array ``[B, H, W, C]`` or ``[H, W, C]``: ``uint8`` in 0..255 or float in 0..1.

``C`` may be 3 (RGB), 4 (RGBA: alpha is ignored for scoring) or 1 (grey).

Everything is first turned into a list of ``uint8`` RGB arrays ``[H, W, 3]``
(:func:`to_uint8_list`); the backends take what they need from there (PIL images,
BGR arrays for OpenCV/NudeNet, a float batch).  :func:`replace_images` writes
new RGB content back into the caller's own layout, which is what ``censor`` uses.
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
    "describe",
    "float_to_uint8",
    "to_uint8_list",
    "to_uint8_batch",
    "to_pil_list",
    "to_bgr_list",
    "replace_images",
]


def _is_torch_tensor(x: Any) -> bool:
    # Avoid importing torch just to find out that the input is not a tensor.
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach") and hasattr(x, "shape")


@dataclass(frozen=True)
class Layout:
    """How the caller's images were laid out, so results can be returned alike."""

    kind: str  # "torch" | "numpy" | "pil" | "pil_list"
    batched: bool  # False for a single [H, W, C] array/tensor or a single PIL image
    dtype: Any = None  # numpy/torch dtype of array inputs
    channels: int = 3
    count: int = 0


def float_to_uint8(x: np.ndarray) -> np.ndarray:
    """0..1 floats -> uint8 0..255 with rounding (exact inverse of ``u8 / 255``)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
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


def _hwc_to_rgb(arr: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 -> contiguous [H, W, 3] uint8 RGB."""
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


def _torch_to_numpy(t: "torch.Tensor") -> np.ndarray:
    t = t.detach()
    if t.dtype.is_floating_point and t.dtype not in (_torch().float32, _torch().float64):
        t = t.float()  # bf16/fp16 have no numpy equivalent (bf16) or lose nothing by this
    return t.cpu().numpy()


def _torch():
    import torch

    return torch


def describe(images: ImagesLike) -> Layout:
    """Return the :class:`Layout` of ``images`` (raises on unsupported input)."""
    if isinstance(images, Image.Image):
        return Layout("pil", batched=False, channels=len(images.getbands()), count=1)
    if isinstance(images, (list, tuple)):
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must contain PIL images only")
        return Layout("pil_list", batched=True, count=len(images))
    if _is_torch_tensor(images):
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a [B, H, W, C] or [H, W, C] tensor, got {tuple(images.shape)}")
        batched = images.ndim == 4
        return Layout(
            "torch",
            batched=batched,
            dtype=images.dtype,
            channels=int(images.shape[-1]),
            count=int(images.shape[0]) if batched else 1,
        )
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a [B, H, W, C] or [H, W, C] array, got {images.shape}")
        batched = images.ndim == 4
        return Layout(
            "numpy",
            batched=batched,
            dtype=images.dtype,
            channels=int(images.shape[-1]),
            count=int(images.shape[0]) if batched else 1,
        )
    raise TypeError(
        "images must be a torch tensor [B,H,W,C] (ComfyUI IMAGE), a numpy array, "
        f"a PIL image or a list of PIL images; got {type(images).__name__}"
    )


def to_uint8_list(images: ImagesLike) -> list[np.ndarray]:
    """Any accepted input -> list of contiguous ``uint8`` RGB arrays ``[H, W, 3]``."""
    layout = describe(images)
    if layout.kind == "pil":
        return [_pil_to_rgb(images)]
    if layout.kind == "pil_list":
        return [_pil_to_rgb(im) for im in images]
    arr = _torch_to_numpy(images) if layout.kind == "torch" else np.asarray(images)
    if not layout.batched:
        arr = arr[None]
    arr = _array_to_uint8(arr)
    return [_hwc_to_rgb(a) for a in arr]


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


def to_bgr_list(images: ImagesLike) -> list[np.ndarray]:
    """List of contiguous ``uint8`` **BGR** arrays ``[H, W, 3]`` (OpenCV / NudeNet order)."""
    return [np.ascontiguousarray(a[..., ::-1]) for a in to_uint8_list(images)]


def _fit_to(rgb: np.ndarray, original: np.ndarray, is_float: bool) -> np.ndarray:
    """New RGB uint8 content in the original's channel count and value range.

    Returns float32 0..1 when ``is_float`` else uint8; an alpha channel of the
    original is kept as it was.
    """
    new = rgb.astype(np.float32) / 255.0 if is_float else rgb
    c = original.shape[-1]
    if c == 3:
        return new
    if c == 4:
        return np.concatenate([new, original[..., 3:4].astype(new.dtype)], axis=-1)
    if c == 1:
        grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)[..., None]
        return grey.astype(np.float32) / 255.0 if is_float else grey
    raise ValueError(f"unsupported channel count {c}")


def replace_images(images: ImagesLike, replacements: dict[int, np.ndarray]) -> ImagesLike:
    """Copy of ``images`` with entries ``i`` replaced by ``uint8`` RGB arrays.

    The result has the caller's layout (type, batching, dtype, device, channel
    count, PIL mode). Images not in ``replacements`` are passed through unchanged
    (same values; for PIL lists the very same objects). Replacement arrays must
    have the size of the image they replace.
    """
    layout = describe(images)
    if layout.kind in ("pil", "pil_list"):
        src = [images] if layout.kind == "pil" else list(images)
        out = list(src)
        for i, rgb in replacements.items():
            new = Image.fromarray(np.ascontiguousarray(rgb))
            mode = src[i].mode
            if mode != "RGB":
                try:
                    if mode in ("RGBA", "LA") and "A" in src[i].getbands():
                        alpha = src[i].getchannel("A")
                        new = new.convert(mode)
                        new.putalpha(alpha)
                    else:
                        new = new.convert(mode)
                except (ValueError, OSError):
                    pass  # exotic mode: keep RGB
            out[i] = new
        if layout.kind == "pil":
            return out[0]
        return type(images)(out) if isinstance(images, tuple) else out

    if layout.kind == "numpy":
        out = np.array(images, copy=True)
        view = out if layout.batched else out[None]
        is_float = np.issubdtype(out.dtype, np.floating)
        for i, rgb in replacements.items():
            view[i] = _fit_to(rgb, view[i], is_float).astype(out.dtype)
        return out

    # torch
    torch = _torch()
    out = images.clone()
    view = out if layout.batched else out.unsqueeze(0)
    is_float = out.dtype.is_floating_point
    for i, rgb in replacements.items():
        orig = _torch_to_numpy(view[i])
        new = torch.from_numpy(np.ascontiguousarray(_fit_to(rgb, orig, is_float)))
        view[i] = new.to(dtype=out.dtype, device=out.device)
    return out
