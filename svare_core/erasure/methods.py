"""Erasure methods: one objective each, written against an ErasureRun (erasure/run.py).

A method says which prompts need auxiliary tokens, what the frozen model must compute once,
and what one iteration does. The loop that runs them is erasure/trainer.py. Notation
(erasure/losses.py has the formulas): c_u the unsafe prompt, c_s its safe anchor, x_s and y_s
the teacher-forcing inputs and labels (bits, or VQ code indices) of an image the frozen model drew
for c_s.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from . import losses
from .config import EraseConfig
from .pairs import PromptPair
from .robust import AdversarialPool
from .run import ErasureRun


class ErasureMethod:
    """The interface the trainer runs; subclasses override what they need."""
    name: ClassVar[str]

    def preserve_prompts(self, cfg: EraseConfig, given: list[str]) -> list[str]:
        """The preservation prompts this method reads (only those need auxiliary tokens and targets)."""
        return []

    def token_prompts(self, run: ErasureRun) -> list[str]:
        """Prompts whose images (auxiliary tokens) the frozen model draws before training."""
        return [p.safe for p in run.pairs] + run.preserve_prompts

    def teacher_targets(self, run: ErasureRun) -> dict[str, torch.Tensor]:
        """The frozen model's outputs the losses compare with, per prompt and auxiliary sample."""
        return {}

    def step(self, run: ErasureRun, batch: list[PromptPair]) -> tuple[dict[str, float], bool]:
        """One iteration: the losses to record, and whether every optimizer step was finite."""
        raise NotImplementedError


def supervised_tokens(scales, which: str, device=None) -> torch.Tensor | None:
    """The tokens the erasure losses supervise: all (None), or "first": the coarsest scale's only
    (SACE's ablation: confine the intervention to scale 0)."""
    return None if which == "all" else losses.scale_mask(scales, [0], device)


def _supervised_mask(run: ErasureRun) -> torch.Tensor | None:
    return supervised_tokens(run.scales, run.cfg.research.supervised_scales, run.device)


class SVARE(ErasureMethod):
    """S-VARE (arXiv 2509.22400), two optimizer steps an iteration:

        L_FCE = CE(student(c_u; x_s), y_s) on the tokens still drawn "unsafely"  (>= token_error_rate wrong bits)
        L_Pre = lambda * KL(frozen_cfg(c; x_c) || student(c; x_c)),  c in {c_s} + preservation prompts

    Robust (``cfg.robust``): adversarial conditions found against the student during training join
    the unsafe prompts of L_FCE (erasure/robust.py).
    """
    name = "svare"
    _pool: AdversarialPool | None = None

    def preserve_prompts(self, cfg: EraseConfig, given: list[str]) -> list[str]:
        return list(dict.fromkeys(given)) if self._preserving(cfg) and cfg.preserve_per_step else []

    @staticmethod
    def _preserving(cfg: EraseConfig) -> bool:
        return cfg.preservation_weight > 0

    def teacher_targets(self, run: ErasureRun) -> dict[str, torch.Tensor]:
        self._pool = AdversarialPool(run) if run.cfg.robust else None
        if not self._preserving(run.cfg):
            return {}
        r = run.cfg.research
        guidance = run.cfg.teacher_cfg if r.preserve_cfg is None else r.preserve_cfg
        return {p: run.frozen_logits([p] * len(run.aux[p]), run.aux[p].inputs.to(run.device), guidance,
                                     r.teacher_tau).cpu()
                for p in dict.fromkeys([p.safe for p in run.pairs] + run.preserve_prompts)}

    def step(self, run: ErasureRun, batch: list[PromptPair]) -> tuple[dict[str, float], bool]:
        cfg = run.cfg
        erase_batch = batch + (self._pool.step(run, batch) if self._pool is not None else [])
        _, x, y = run.aux_batch([p.safe for p in erase_batch])
        logits = run.student_logits([p.unsafe for p in erase_batch], x, cfg.student_cfg)
        loss, kept = losses.filtered_ce(logits, y, bit_threshold=cfg.research.bit_threshold,
                                        token_error_rate=cfg.token_error_rate, token_mask=_supervised_mask(run))
        ok = run.optimize(loss)
        rec = {"kept_tokens": kept, "erase": loss.item()}
        if self._pool is not None:
            rec["adversarial_pairs"] = float(len(erase_batch) - len(batch))
            rec["attacks_screened_out"] = float(self._pool.rejected)
        if self._preserving(cfg):
            pre = cfg.preservation_weight * losses.preservation_kl(*run.on_samples(self._preserve_batch(run, batch),
                                                                                   cfg.student_cfg))
            ok = run.optimize(pre) and ok
            rec["preserve"] = pre.item()
        return rec, ok

    @staticmethod
    def _preserve_batch(run: ErasureRun, batch: list[PromptPair]) -> list[str]:
        """The batch's safe prompts and, per concept, ``preserve_per_step`` random preservation prompts."""
        prompts = [p.safe for p in batch]
        per_step = run.cfg.preserve_per_step
        if run.preserve_prompts and per_step:
            chosen = torch.randperm(len(run.preserve_prompts), generator=run.generator)[:per_step].tolist()
            prompts += [run.preserve_prompts[i] for i in chosen]
        return prompts


class VARE(ErasureMethod):
    """Naive VARE: L = CE(student(c_u; x_s), y_s) on every token; nothing preserved."""
    name = "vare"

    def step(self, run: ErasureRun, batch: list[PromptPair]) -> tuple[dict[str, float], bool]:
        _, x, y = run.aux_batch([p.safe for p in batch])
        logits = run.student_logits([p.unsafe for p in batch], x, run.cfg.student_cfg)
        loss = losses.plain_ce(logits, y, token_mask=_supervised_mask(run))
        return {"erase": loss.item()}, run.optimize(loss)


class ESD(ErasureMethod):
    """ESD on logits: L = || student(c_u; x_u) - (frozen(empty) - eta (frozen(c_u) - frozen(empty))) ||^2
    on 1-3 random coarse scales a step (as the SACE authors' prototype does), x_u drawn for c_u."""
    name = "esd"

    def token_prompts(self, run: ErasureRun) -> list[str]:
        return [p.unsafe for p in run.pairs]

    @torch.no_grad()
    def teacher_targets(self, run: ErasureRun) -> dict[str, torch.Tensor]:
        out = {}
        for p in {p.unsafe for p in run.pairs}:
            concept, empty = run.frozen_pair([p] * len(run.aux[p]), run.aux[p].inputs.to(run.device))
            out[p] = losses.esd_target(empty, concept, run.cfg.research.esd_eta).cpu()
        return out

    def step(self, run: ErasureRun, batch: list[PromptPair]) -> tuple[dict[str, float], bool]:
        n_coarse = min(len(run.scales), 4)
        order = torch.randperm(n_coarse, generator=run.generator)
        chosen = order[: int(torch.randint(1, 4, (1,), generator=run.generator))].tolist()
        # ESD regresses the conditional logits, as its authors do.
        logits, target = run.on_samples([p.unsafe for p in batch], guidance=1.0)
        loss = losses.esd_loss(logits, target, losses.scale_mask(run.scales, chosen, run.device))
        return {"esd": loss.item()}, run.optimize(loss)


METHODS: dict[str, type[ErasureMethod]] = {m.name: m for m in (SVARE, VARE, ESD)}


def method_for(name: str) -> ErasureMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}")
    return METHODS[name]()
