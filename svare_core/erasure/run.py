"""One erasure run's context: the frozen model and its trainable copy, the optimizer, the
auxiliary tokens and teacher outputs, and the few operations every method is written in."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from ..models.infinity import Infinity
from ..pipeline import VARPipeline
from . import losses
from .config import EraseConfig
from .pairs import PromptPair
from .tokens import AuxTokens


@dataclass
class ErasureRun:
    pipe: VARPipeline
    frozen: Infinity
    student: Infinity
    cfg: EraseConfig
    pairs: list[PromptPair]
    preserve_prompts: list[str]
    scales: list[tuple[int, int]]
    generator: torch.Generator
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    aux: dict[str, AuxTokens] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)    # prompt -> frozen outputs per aux sample

    @property
    def device(self) -> torch.device:
        return self.frozen.device

    def randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def aux_batch(self, prompts: list[str]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One random auxiliary sample per prompt: its indices, teacher-forcing inputs and bits."""
        idx = [self.randint(len(self.aux[p])) for p in prompts]
        x = torch.stack([self.aux[p].inputs[i] for p, i in zip(prompts, idx)]).to(self.device)
        y = torch.stack([self.aux[p].bits[i] for p, i in zip(prompts, idx)]).to(self.device)
        return idx, x, y

    def student_logits(self, prompts: list[str], x: torch.Tensor, guidance: float) -> torch.Tensor:
        """The student's conditional logits, or with ``guidance`` != 1 its guided ones, the distribution
        the sampler draws from (the unconditional pass is the student's own, without gradient)."""
        feats, mask = self.pipe.encode_prompts(prompts)
        student, cfg = self.student, self.cfg
        enabled = cfg.precision == "bf16" and (self.device.type == "cuda" or kernels.cpu_bf16_native())
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled):
            cond = student(student.encode_text(feats, mask), x, self.scales, checkpointing=cfg.gradient_checkpointing)
            if guidance == 1.0:
                return cond
            with torch.no_grad():
                uncond = student(student.encode_text(student.uncond_features(mask), mask), x, self.scales)
        return losses.guided_logits(cond, uncond, guidance)

    @torch.no_grad()
    def frozen_logits(self, prompts: list[str], x: torch.Tensor, guidance: float, tau: float = 1.0) -> torch.Tensor:
        """The frozen model's logits, guided by ``guidance`` (1: the conditional pass), at temperature ``tau``."""
        model = self.frozen
        feats, mask = self.pipe.encode_prompts(prompts)
        cond = model(model.encode_text(feats, mask), x, self.scales)
        if guidance == 1.0:
            return cond / tau
        uncond = model(model.encode_text(model.uncond_features(mask), mask), x, self.scales)
        return losses.guided_logits(cond, uncond, guidance, tau)

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
