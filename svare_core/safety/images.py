"""Writing new content back into the caller's image layout (what ``censor`` uses).

The conversions every safety backend reads its input with (``to_uint8_list``,
``to_pil_list``, ``to_bgr_list``, ...) live in :mod:`svare_core.imageio`;
:func:`replace_images` is their inverse for a few images of a batch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..imageio import ImagesLike, as_array, describe

__all__ = ["replace_images"]


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
    import torch

    out = images.clone()
    view = out if layout.batched else out.unsqueeze(0)
    is_float = out.dtype.is_floating_point
    for i, rgb in replacements.items():
        orig = as_array(view[i])
        new = torch.from_numpy(np.ascontiguousarray(_fit_to(rgb, orig, is_float)))
        view[i] = new.to(dtype=out.dtype, device=out.device)
    return out
