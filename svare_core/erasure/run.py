"""One erasure run's context: the frozen model and its trainable copy, the optimizer, the
auxiliary tokens and teacher outputs, and the few operations every method is written in.

The families differ here only in two things: the unconditional rows of guidance (Infinity's learned
empty features under the prompt's mask; Switti's encoding of the empty prompt, as its sampler does)
and the guidance weight (Infinity's one weight; Switti's ramp over the scales, sampling_vq).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .. import kernels
from ..models.infinity import Infinity
from ..models.switti import Switti
from ..pipeline import VARPipeline
from ..sampling import SamplerSettings
from . import losses
from .config import EraseConfig
from .pairs import PromptPair
from .tokens import AuxTokens

# How far a row's logits may move when its pass is batched with others (float roundings of a larger
# product; measured on the toy model: at most 4.8e-6 on logits of magnitude ~10).
BATCHED_PASS_ATOL = 1e-4


@dataclass
class ErasureRun:
    pipe: VARPipeline
    frozen: Infinity | Switti
    student: Infinity | Switti
    cfg: EraseConfig
    pairs: list[PromptPair]
    preserve_prompts: list[str]
    scales: list[tuple[int, int]]
    generator: torch.Generator
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    aux: dict[str, AuxTokens] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)    # prompt -> frozen outputs per aux sample
    sampler: SamplerSettings | None = None      # what drew the auxiliary tokens (a VQ model's guidance ramp)

    @property
    def device(self) -> torch.device:
        return self.frozen.device

    def randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def aux_batch(self, prompts: list[str]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One random auxiliary sample per prompt: its indices, teacher-forcing inputs and labels."""
        idx = [self.randint(len(self.aux[p])) for p in prompts]
        x = torch.stack([self.aux[p].inputs[i] for p, i in zip(prompts, idx)]).to(self.device)
        y = torch.stack([self.aux[p].labels[i] for p, i in zip(prompts, idx)]).to(self.device)
        return idx, x, y

    def conditions(self, model, prompts: list[str], unconditional: bool = False):
        """``model``'s condition of ``prompts`` and, if asked, of guidance's unconditional rows (else None)."""
        text = self.pipe.encode_prompts(prompts)
        cond = model.encode_text(*text)
        if not unconditional:
            return cond, None
        if hasattr(model, "uncond_features"):           # Infinity: learned empty features, the same mask
            mask = text[1]
            return cond, model.encode_text(model.uncond_features(mask), mask)
        return cond, model.encode_text(*self.pipe.encode_prompts([""] * len(prompts)))

    def guidance(self, weight: float) -> float | torch.Tensor:
        """The guidance weight of every token: ``weight`` for a bitwise model; for a VQ model (Switti) the
        sampler's ramp with cfg = ``weight``: 1 + cfg * si / (S-1) on its guided scales, 1 elsewhere."""
        if getattr(self.frozen, "token_kind", "bits") != "vq":
            return weight
        from ..sampling_vq import VQSamplerSettings, token_guidance
        s = self.sampler if isinstance(self.sampler, VQSamplerSettings) else VQSamplerSettings()
        return token_guidance(replace(s, cfg=weight), self.scales)

    def student_logits(self, prompts: list[str], x: torch.Tensor, guidance: float) -> torch.Tensor:
        """The student's conditional logits, or with ``guidance`` != 1 its guided ones, the distribution
        the sampler draws from (the unconditional pass is the student's own, without gradient)."""
        student, cfg = self.student, self.cfg
        enabled = cfg.precision == "bf16" and (self.device.type == "cuda" or kernels.cpu_bf16_native())
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled):
            c, u = self.conditions(student, prompts, unconditional=guidance != 1.0)
            cond = student(c, x, self.scales, checkpointing=cfg.gradient_checkpointing)
            if guidance == 1.0:
                return cond
            with torch.no_grad():
                uncond = student(u, x, self.scales)
        return losses.guided_logits(cond, uncond, self.guidance(guidance))

    @torch.no_grad()
    def frozen_pair(self, prompts: list[str], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's conditional and unconditional logits on ``x``, from one forward of 2B rows (the
        rows never mix, so this is the two separate passes but for the roundings a larger product gets:
        within ``BATCHED_PASS_ATOL``, tests/test_erasure_passes.py; bench_speedup.py ``passes`` times both)."""
        model = self.frozen
        c, u = self.conditions(model, prompts, unconditional=True)
        cond, uncond = model(c.cat(u), torch.cat([x, x]), self.scales).chunk(2)
        return cond, uncond

    @torch.no_grad()
    def frozen_logits(self, prompts: list[str], x: torch.Tensor, guidance: float, tau: float = 1.0) -> torch.Tensor:
        """The frozen model's logits, guided by ``guidance`` (1: the conditional pass), at temperature ``tau``."""
        if guidance == 1.0:
            model = self.frozen
            c, _ = self.conditions(model, prompts)
            return model(c, x, self.scales) / tau
        return losses.guided_logits(*self.frozen_pair(prompts, x), self.guidance(guidance), tau)

    def on_samples(self, prompts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's logits on one random auxiliary sample per prompt, and the teacher's for it."""
        idx, x, _ = self.aux_batch(prompts)
        target = torch.stack([self.teacher[p][i] for p, i in zip(prompts, idx)]).to(self.device)
        return self.student_logits(prompts, x, guidance), target

    def optimize(self, loss: torch.Tensor) -> bool:
        """One guarded optimizer step: a non-finite loss or gradient changes nothing (and says so)."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return False
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.research.grad_clip)
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            return False
        opt.step()
        return True
