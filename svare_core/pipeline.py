"""A loaded text-to-image VAR model: transformer + VAE + text encoder, and their devices."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from .models.format import state_dict_fingerprint
from .models.infinity import Infinity, TextCondition
from .models.text import TextEncoder
from .models.vae import BSQVAE


@dataclass
class VARPipeline:
    transformer: Infinity
    vae: BSQVAE
    text_encoder: TextEncoder
    name: str = "model"
    family: str = "infinity"                        # whose default settings apply (svare_core.families)
    scales: list[tuple[int, int]] | None = None   # the default schedule (small models); None: use presets
    text_encoder_name: str | None = None            # how model files refer to the text encoder ("minilm", a folder)
    patches: list = field(default_factory=list)     # (ErasurePatch, strength) applied, in order
    base_transformer: Infinity | None = None        # the unpatched transformer (shared, never modified)
    base_fingerprint: str | None = None             # fingerprint of the transformer before any patch

    def __post_init__(self) -> None:
        if getattr(self.transformer, "token_kind", "bits") == "vq":
            self._check_vq_pair()
        elif self.transformer.cfg.bits != getattr(self.vae.cfg, "bits", None):
            gives = f"gives {self.vae.cfg.bits}-bit tokens" if hasattr(self.vae.cfg, "bits") else "is a VQ-VAE (no bits)"
            raise ValueError(f"the VAE {gives} but the transformer expects {self.transformer.cfg.bits}-bit tokens: "
                             "pair the transformer with its own VAE")
        if self.transformer.cfg.text_dim != self.text_encoder.width:
            raise ValueError(f"the text encoder gives {self.text_encoder.width}-wide features but the transformer "
                             f"expects {self.transformer.cfg.text_dim}: pair it with its own text encoder")
        if self.base_fingerprint is None:
            base = self.base_transformer or self.transformer
            # A loader that streamed the checkpoint hashed the source tensors as it read them.
            self.base_fingerprint = getattr(base, "source_fingerprint", None) or state_dict_fingerprint(base.state_dict())

    def _check_vq_pair(self) -> None:
        t, v = self.transformer.cfg, self.vae.cfg
        if (getattr(v, "vocab_size", None), v.z_channels) != (t.vocab_size, t.code_dim):
            raise ValueError(f"the transformer draws {t.vocab_size} codes of width {t.code_dim} but the VAE "
                             f"{'has ' + str(v.vocab_size) + ' codes' if hasattr(v, 'vocab_size') else 'has no codebook'} "
                             f"of width {v.z_channels}: pair Switti with its VQ-VAE (VQVAE-Switti)")

    def fingerprint(self) -> str:
        """Content hash of the transformer's current weights in their dtype (keys caches of its outputs)."""
        return state_dict_fingerprint(self.transformer.state_dict(), exact=True)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """Text-encoder features and mask (and, for Switti, the pooled vector), on the transformer's device."""
        return tuple(t.to(self.transformer.device) for t in self.text_encoder.encode(list(prompts)))

    def condition(self, prompts: list[str]) -> TextCondition:
        return self.transformer.encode_text(*self.encode_prompts(prompts))

    def default_scales(self, aspect_ratio: str = "1:1", preset: str = "1M") -> list[tuple[int, int]]:
        if self.scales:
            return list(self.scales)
        if getattr(self.transformer, "token_kind", "bits") == "vq":
            return list(self.transformer.cfg.scales)       # Switti: square, the schedule it was trained on
        from .schedules import infinity_schedule
        return infinity_schedule(aspect_ratio, preset)

    def with_transformer(self, transformer: Infinity, patches: list | None = None,
                         base_transformer: Infinity | None = None) -> "VARPipeline":
        """A new pipeline sharing the VAE and text encoder, with another transformer."""
        return replace(self, transformer=transformer, patches=list(self.patches if patches is None else patches),
                       base_transformer=base_transformer or self.base_transformer or self.transformer,
                       base_fingerprint=self.base_fingerprint)

    def clone_transformer(self) -> Infinity:
        """A deep copy of the transformer (callers must never modify a pipeline they were given)."""
        return copy.deepcopy(self.transformer)
