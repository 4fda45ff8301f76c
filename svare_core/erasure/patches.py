"""Erasure patches: small shareable files that turn a base model into an erased one.

A patch holds only what changed (dense deltas of trained tensors, or LoRA factors) plus metadata
(base-model fingerprint, concepts, method, hyperparameters, metrics). Patches apply with a
strength and stack; a patched model is always rebuilt from the untouched base weights, so
removing a patch gives the base weights back exactly. A patch made for another base is refused
unless forced.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..models.format import atomic_save_safetensors, save_model
from ..models.infinity import Infinity
from ..pipeline import VARPipeline

PATCH_FORMAT = "svare-erasure-patch"
PATCH_VERSION = 1
_LORA_A, _LORA_B = ".lora_A", ".lora_B"


class PatchError(ValueError):
    """A patch that cannot be applied or read; the message says why and what to do."""


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

    def save(self, path: str | Path) -> Path:
        meta = {"format": PATCH_FORMAT, "format_version": str(PATCH_VERSION), "svare_patch": json.dumps(self.meta)}
        return atomic_save_safetensors(self.tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "ErasurePatch":
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"{path}: no such patch file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise PatchError(f"{path}: cannot be read as a safetensors patch ({e}); "
                             "the file is corrupt or truncated") from e
        if header.get("format") != PATCH_FORMAT:
            raise PatchError(f"{path}: is not an erasure patch (format {header.get('format')!r}); "
                             "to load a model use Load VAR / load_pipeline instead")
        if int(header.get("format_version", 0)) > PATCH_VERSION:
            raise PatchError(f"{path}: patch format {header['format_version']} is newer than this version of svare "
                             f"({PATCH_VERSION}); update svare")
        return cls(tensors, json.loads(header.get("svare_patch", "{}")))


def _rebuild(pipe: VARPipeline, stack: list[tuple[ErasurePatch, float]]) -> VARPipeline:
    base: Infinity = pipe.base_transformer or pipe.transformer
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
        model = Infinity(base.cfg)
    # Untouched tensors are shared with the base (no copy of a multi-GB model); touched ones are new.
    model.load_state_dict(new_state, assign=True)
    model.eval().requires_grad_(False)
    return pipe.with_transformer(model, patches=stack, base_transformer=base)


def apply_patch(pipe: VARPipeline, patch: ErasurePatch, strength: float = 1.0, *, force: bool = False) -> VARPipeline:
    """A new pipeline with ``patch`` added on top of the ones already applied. ``pipe`` is not modified."""
    if patch.base_fingerprint and patch.base_fingerprint != pipe.base_fingerprint and not force:
        raise PatchError(f"this patch (erasing {patch.concepts}) was made for the base model "
                         f"{patch.base_fingerprint}, not for this one ({pipe.base_fingerprint}). "
                         "Load the model it was made for, or force it (results are then unpredictable)")
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
