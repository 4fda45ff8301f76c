"""Erasure patches: small shareable files that turn a base model into an erased one.

A patch holds only what changed (dense deltas of trained tensors, or LoRA factors) plus metadata
(base-model fingerprint, concepts, method, hyperparameters, metrics). Patches apply with a
strength and stack; a patched model is always rebuilt from the untouched base weights, so
removing a patch gives the base weights back exactly. A patch made for another base is refused
unless forced.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..models.format import atomic_save_safetensors, content_checksum, save_model
from ..models.infinity import Infinity
from ..models.switti import Switti
from ..pipeline import VARPipeline

PATCH_FORMAT = "svare-erasure-patch"
PATCH_VERSION = 2            # 2: a checksum of the tensor data and a base fingerprint, both required
_LORA_A, _LORA_B = ".lora_A", ".lora_B"


class PatchError(ValueError):
    """A patch that cannot be applied or read; the message says why and what to do."""


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The identity of a patch's tensor data (what a patch trained on top of it records)."""
    return content_checksum(tensors)


def _file_checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """What a patch file records and loading verifies: its tensors and its metadata."""
    return content_checksum(tensors, meta_json)


# metadata field -> (what it must be, the check); fields not listed are free-form (metrics, notes)
_META_FIELDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "base_fingerprint": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "concepts": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
    "method": ("a string", lambda v: isinstance(v, str)),
    "steps": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "lora_scale": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)),
    "pairs": ("a list of [unsafe, safe] pairs", lambda v: isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in v)),
    "trained_on": ("a list of [checksum, strength] pairs", lambda v: isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], (int, float)) for p in v)),
    "hyperparameters": ("a mapping", lambda v: isinstance(v, dict)),
    "metrics": ("a mapping", lambda v: isinstance(v, dict)),
}


@dataclass
class ErasurePatch:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.meta.get("concepts", []))

    @property
    def base_fingerprint(self) -> str | None:
        return self.meta.get("base_fingerprint")

    def checksum(self) -> str:
        return tensor_checksum(self.tensors)

    def delta_names(self) -> list[str]:
        """The parameters this patch changes."""
        return [n[: -len(_LORA_A)] if n.endswith(_LORA_A) else n for n in self.tensors if not n.endswith(_LORA_B)]

    def delta(self, name: str) -> torch.Tensor:
        """The dense fp32 delta of one parameter (a LoRA pair multiplied out)."""
        if name + _LORA_A in self.tensors:
            scale = float(self.meta.get("lora_scale", 1.0))
            return scale * (self.tensors[name + _LORA_B].float() @ self.tensors[name + _LORA_A].float())
        return self.tensors[name].float()

    def deltas(self) -> dict[str, torch.Tensor]:
        """Parameter name -> dense delta (LoRA factors multiplied out)."""
        return {name: self.delta(name) for name in self.delta_names()}

    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def validate(self, where: str = "this patch", *, require_base: bool = True) -> None:
        """Refuse a patch that would give a wrong model: metadata of the wrong type, no base fingerprint
        (unless ``require_base`` is off), a LoRA factor without its pair, non-floating or non-finite tensors."""
        if not isinstance(self.meta, dict):
            raise PatchError(f"{where}: its metadata is a {type(self.meta).__name__}, not a mapping; the patch is "
                             "corrupt or was edited by hand")
        for key, (what, ok) in _META_FIELDS.items():
            if key in self.meta and not ok(self.meta[key]):
                raise PatchError(f"{where}: metadata field {key!r} must be {what}, got {self.meta[key]!r:.60}; "
                                 "the patch is corrupt or was edited by hand")
        if require_base and not self.base_fingerprint:
            raise PatchError(f"{where}: records no base model fingerprint, so nothing tells which model it fits; "
                             "train it again with svare (patches record the model they were made for), or force it")
        if not self.tensors:
            raise PatchError(f"{where}: holds no tensors")
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise PatchError(f"{where}: {name} is not a floating-point tensor; the patch is corrupt")
            pair = name[: -len(_LORA_A)] + _LORA_B if name.endswith(_LORA_A) else \
                name[: -len(_LORA_B)] + _LORA_A if name.endswith(_LORA_B) else None
            if pair is not None and pair not in self.tensors:
                raise PatchError(f"{where}: the LoRA factor {name} has no {pair}; the patch is incomplete")
            if not bool(torch.isfinite(t).all()):
                raise PatchError(f"{where}: {name} holds NaN or infinite values (the training that made it "
                                 "diverged): train it again with a lower learning rate")

    def save(self, path: str | Path) -> Path:
        """Write the patch (atomically), after checking it; the file records its tensors' checksum."""
        path = Path(path)
        self.validate(f"{path.name}")
        try:
            body = json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise PatchError(f"{path.name}: its metadata cannot be stored as JSON ({e})") from e
        meta = {"format": PATCH_FORMAT, "format_version": str(PATCH_VERSION), "svare_patch": body,
                "checksum": _file_checksum(self.tensors, body)}
        return atomic_save_safetensors(self.tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "ErasurePatch":
        """Read a patch and verify it: format, checksum of the tensor data, metadata, finite values."""
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"{path}: no such patch file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a broken file
            raise PatchError(f"{path}: cannot be read as a safetensors patch ({e}); "
                             "the file is corrupt or truncated") from e
        if header.get("format") != PATCH_FORMAT:
            raise PatchError(f"{path}: is not an erasure patch (format {header.get('format')!r}); "
                             "to load a model use Load VAR / load_pipeline instead")
        version = header.get("format_version", "")
        if not version.isdigit():
            raise PatchError(f"{path}: its format version {version!r} is not a number; the file is corrupt")
        if int(version) > PATCH_VERSION:
            raise PatchError(f"{path}: patch format {version} is newer than this version of svare "
                             f"({PATCH_VERSION}); update svare")
        if "checksum" not in header:
            raise PatchError(f"{path}: has no checksum of its tensor data (format {version}, made by an older svare), "
                             "so a corrupted copy could not be told: train it again, or ask its author for a new copy")
        if _file_checksum(tensors, header.get("svare_patch", "")) != header["checksum"]:
            raise PatchError(f"{path}: its content does not match its checksum: the file was corrupted (in a "
                             "download or on disk) or edited. Get a fresh copy")
        try:
            meta = json.loads(header.get("svare_patch", ""))
        except ValueError as e:
            raise PatchError(f"{path}: its metadata is not valid JSON ({e}); the file is corrupt") from e
        patch = cls(tensors, meta)
        patch.validate(str(path))
        return patch


def _rebuild(pipe: VARPipeline, stack: list[tuple[ErasurePatch, float]]) -> VARPipeline:
    base: Infinity | Switti = pipe.base_transformer or pipe.transformer
    state = base.state_dict()
    names = list(dict.fromkeys(n for patch, _ in stack for n in patch.delta_names()))
    for patch, _ in stack:
        for name in patch.delta_names():
            if name not in state:
                raise PatchError(f"patch for {patch.concepts} changes {name!r}, which this model does not have: "
                                 "it was made for another architecture")
            shape = tuple(patch.tensors[name].shape) if name in patch.tensors else \
                (patch.tensors[name + _LORA_B].shape[0], patch.tensors[name + _LORA_A].shape[1])
            if shape != tuple(state[name].shape):
                raise PatchError(f"patch for {patch.concepts}: {name} has shape {shape}, the model "
                                 f"{tuple(state[name].shape)}: it was made for another model")
    # One parameter at a time: at real size a LoRA patch on the attention expands to ~1B values, which
    # must never exist in fp32 all at once (on a 12 GB GPU the model itself takes 4.4).
    new_state, changes = dict(state), [set(patch.delta_names()) for patch, _ in stack]
    for name in names:
        acc = state[name].float()
        for (patch, strength), changed in zip(stack, changes):
            if name in changed:
                acc = acc + strength * patch.delta(name).to(acc.device)
        new_state[name] = acc.to(state[name].dtype)
        del acc
    with torch.device("meta"):
        model = type(base)(base.cfg)                 # Infinity or Switti: the base's own class
    # Untouched tensors are shared with the base (no copy of a multi-GB model); touched ones are new.
    model.load_state_dict(new_state, assign=True)
    model.eval().requires_grad_(False)
    return pipe.with_transformer(model, patches=stack, base_transformer=base)


def applied(pipe: VARPipeline) -> list[list]:
    """[checksum, strength] of each patch applied to ``pipe``, in order (what a patch trained on it records)."""
    return [[patch.checksum(), float(strength)] for patch, strength in pipe.patches]


def apply_patch(pipe: VARPipeline, patch: ErasurePatch, strength: float = 1.0, *, force: bool = False) -> VARPipeline:
    """A new pipeline with ``patch`` added on top of the ones already applied. ``pipe`` is not modified.

    Refused: a non-finite strength, a patch that fails its checks, and (unless ``force``) a patch
    made for another base model, or trained on top of patches this pipeline does not have."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise PatchError(f"the strength must be a finite number (1 = as trained, 0 = no effect), got {strength!r}")
    patch.validate(f"the patch erasing {patch.concepts}", require_base=not force)
    if not force:
        if patch.base_fingerprint != pipe.base_fingerprint:
            raise PatchError(f"this patch (erasing {patch.concepts}) was made for the base model "
                             f"{patch.base_fingerprint}, not for this one ({pipe.base_fingerprint}). "
                             "Load the model it was made for, or force it (results are then unpredictable)")
        # Trained on a patched model: that model's patches come first here too (a patch trained on the
        # base may stack on anything).
        trained_on = [[c, float(s)] for c, s in patch.meta.get("trained_on", [])]
        if applied(pipe)[:len(trained_on)] != trained_on:
            raise PatchError(f"this patch (erasing {patch.concepts}) was trained on the model with "
                             f"{len(trained_on)} other patch(es) applied ({[c[:8] for c, _ in trained_on]}), but this "
                             f"model has {len(pipe.patches)} ({[c[:8] for c, _ in applied(pipe)]}): apply the "
                             "same patches, in the same order and strengths, first (or force it)")
    return _rebuild(pipe, list(pipe.patches) + [(patch, float(strength))])


def remove_patch(pipe: VARPipeline, index: int) -> VARPipeline:
    """A new pipeline without the ``index``-th applied patch (exactly the weights it would have had)."""
    stack = list(pipe.patches)
    if not -len(stack) <= index < len(stack):
        raise PatchError(f"no applied patch number {index}: {len(stack)} are applied")
    del stack[index]
    return _rebuild(pipe, stack)


def merge_to_checkpoint(pipe: VARPipeline, path: str | Path) -> Path:
    """Write the patched model as a full standalone model file (transformer + VAE)."""
    concepts = [c for p, _ in pipe.patches for c in p.concepts]
    return save_model(path, transformer=pipe.transformer, vae=pipe.vae,
                      text_encoder=pipe.text_encoder_name, scales=pipe.scales,
                      extra={"name": f"{pipe.name}-erased", "family": pipe.family, "erased_concepts": concepts,
                             "base_fingerprint": pipe.base_fingerprint})
