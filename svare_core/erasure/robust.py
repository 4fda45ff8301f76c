"""Robust erasure: adversarial conditions found during training join the unsafe prompts.

As adversarial unlearning does for diffusion models: every few steps a short soft-prompt attack
(erasure/attacks.py) runs against the model being trained, on the batch's unsafe prompts, aiming
at what the frozen model draws for them; the features it finds are then trained like unsafe
prompts (towards the safe prompt's auxiliary tokens) until the next refresh. The attack's soft
tokens carry over between refreshes (one set per concept), so it keeps pace with the erasure.

The adversarial features reach the model through the text encoder under names of their own
(attacks.InjectedFeatures), so the methods' steps need no second path for them.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .attacks import InjectedFeatures, concept_embedding, optimise_soft_tokens, soft_prompt_features, targets_of
from .pairs import PromptPair, mentions
from .run import ErasureRun
from .tokens import aux_settings, auxiliary_tokens, prompt_seeds


class AdversarialPool:
    """The adversarial conditions of one run: unsafe prompt -> the name its latest features go by."""

    def __init__(self, run: ErasureRun):
        cfg = run.cfg
        self.attackable = [p for p in run.pairs if p.concept and mentions(p.unsafe, p.concept)]
        if not self.attackable:
            raise ValueError("robust erasure attacks the concept's word in the unsafe prompts, and no pair's unsafe "
                             "prompt names its concept: tag the pairs with the concept they name, or train without "
                             "robust")
        self.features: dict[str, torch.Tensor] = {}
        self.names: dict[str, str] = {}
        self.soft: dict[str, torch.Tensor] = {}
        self.steps_taken = 0
        self.attack_seconds = 0.0
        run.pipe = replace(run.pipe, text_encoder=InjectedFeatures(run.pipe.text_encoder, self.features))
        settings = aux_settings(run.pipe, cfg)
        unsafe = list(dict.fromkeys(p.unsafe for p in self.attackable))
        # What the frozen model draws for the unsafe prompts: the images an attacker wants back.
        self.targets = auxiliary_tokens(run.pipe, unsafe, seeds=lambda p: prompt_seeds(p, cfg.seed + 7, 1),
                                        settings=settings, scales=run.scales, cache_dir=cfg.cache_dir)

    def step(self, run: ErasureRun, batch: list[PromptPair]) -> list[PromptPair]:
        """Refresh the attack when due; the batch's adversarial pairs (adversarial name => safe prompt)."""
        import time

        r = run.cfg.research
        if self.steps_taken % r.adversarial_every == 0:
            t0 = time.time()
            self._refresh(run, [p for p in batch if p in self.attackable] or self.attackable[:1])
            self.attack_seconds += time.time() - t0
        self.steps_taken += 1
        return [PromptPair(self.names[p.unsafe], p.safe, p.concept) for p in batch if p.unsafe in self.names]

    def _refresh(self, run: ErasureRun, pairs: list[PromptPair]) -> None:
        r = run.cfg.research
        attacked = replace(run.pipe, transformer=run.student)
        enc = run.pipe.text_encoder
        for concept in dict.fromkeys(p.concept for p in pairs):
            prompts = list(dict.fromkeys(p.unsafe for p in pairs if p.concept == concept))
            targets = targets_of(self.targets, prompts)
            start = self.soft.get(concept)
            if start is None:
                start = concept_embedding(enc, concept, r.adversarial_tokens)
            spread = float(concept_embedding(enc, concept, 1).std())
            self.soft[concept], _ = optimise_soft_tokens(attacked, concept, targets, start, r.adversarial_steps,
                                                         r.adversarial_lr * spread, run.scales,
                                                         run.guidance(run.cfg.teacher_cfg))
            with torch.no_grad():
                feats = soft_prompt_features(enc, prompts, concept, self.soft[concept])
            for prompt, f in zip(prompts, feats):
                name = f"<adversarial: {prompt}>"
                self.features[name] = f
                self.names[prompt] = name
