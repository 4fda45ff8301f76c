"""Robust erasure: conditions an attacker would use join the unsafe prompts.

As adversarial unlearning does for diffusion models, the erasure is trained not only under the
unsafe prompts but under conditions the attacks of erasure/attacks.py build from them, each paired
with its prompt's safe anchor (so the filtered cross-entropy teaches the anchor's drawing there too):

- soft prompts (embedding space): every ``adversarial_every`` steps a soft-prompt attack runs
  against the model being trained, ``adversarial_steps`` Adam steps from the concept's own
  embedding, aiming at what the frozen model draws for the batch's unsafe prompts. Its tokens are
  shared by all prompts, so the features it finds are computed for every unsafe prompt; the
  features of the last ``adversarial_keep`` refreshes stay in training (an earlier attack's finds
  are not forgotten when the next one looks elsewhere).
- near words (prompt space): the text encoder's vocabulary words nearest the concept under which
  the frozen model itself draws the concept (they make its concept images likelier than the prompt
  without the concept word does), put in place of the concept; mined once, before training.
- the concept direction (text-feature space): the mean feature difference with and without the
  concept, added at a random strength to the unsafe prompts with the concept word removed.

Each step, every batch pair whose unsafe prompt names its concept gets one such condition,
drawn from these kinds at random. The conditions reach the model through the text encoder under
names of their own (attacks.InjectedFeatures), so the methods' steps need no second path for them.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from .attacks import (InjectedFeatures, Targets, concept_direction, concept_embedding, near_words, neutral,
                      optimise_soft_tokens, prompt_features, soft_prompt_features, substitute, targets_of, token_nll)
from .pairs import PromptPair, mentions
from .run import ErasureRun
from .tokens import aux_settings, auxiliary_tokens, prompt_seeds

# Strengths of the concept direction drawn in training: up to the attack's strongest (AttackBudget), from
# the weakest of DIRECTION_GRID the frozen model reads as the concept.
DIRECTION_STRENGTHS = (0.5, 4.0)
DIRECTION_GRID = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
# Near words screened by the frozen model against this many of the concept's images (enough to rank words).
SCREEN_IMAGES = 8


class AdversarialPool:
    """The adversarial conditions of one run, and the attacks that keep finding new ones."""

    def __init__(self, run: ErasureRun):
        cfg, r = run.cfg, run.cfg.research
        self.attackable = [p for p in run.pairs if p.concept and mentions(p.unsafe, p.concept)]
        if not self.attackable:
            raise ValueError("robust erasure attacks the concept's word in the unsafe prompts, and no pair's unsafe "
                             "prompt names its concept: tag the pairs with the concept they name, or train without "
                             "robust")
        self.features: dict[str, torch.Tensor] = {}
        self.soft_names: dict[str, list[str]] = {}        # unsafe prompt -> names of its soft-prompt features, newest last
        self.word_prompts: dict[str, list[str]] = {}      # unsafe prompt -> the same with a near word instead
        self.words: dict[str, list[str]] = {}             # concept -> its mined near words
        self.neutral: dict[str, torch.Tensor] = {}        # unsafe prompt -> features without the concept word
        self.direction: dict[str, torch.Tensor] = {}      # concept -> its direction in feature space
        self.direction_from: dict[str, float] = {}        # concept -> the weakest strength trained
        self.screens: dict[str, ConceptScreen] = {}       # concept -> does a condition draw it (frozen model)?
        self.rejected = 0                                 # attacks whose finds the frozen model does not read as the concept
        self.steps_taken = self.refreshes = 0
        self.attack_seconds = 0.0
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        frozen_pipe = replace(run.pipe, transformer=run.frozen)
        run.pipe = replace(run.pipe, text_encoder=InjectedFeatures(run.pipe.text_encoder, self.features))
        settings = aux_settings(run.pipe, cfg)
        unsafe = list(dict.fromkeys(p.unsafe for p in self.attackable))
        # What the frozen model draws for the unsafe prompts: the images an attacker wants back.
        self.targets = auxiliary_tokens(run.pipe, unsafe, seeds=lambda p: prompt_seeds(p, cfg.seed + 7, 1),
                                        settings=settings, scales=run.scales, cache_dir=cfg.cache_dir)
        t0 = time.time()
        for concept in dict.fromkeys(p.concept for p in self.attackable):
            pairs = [p for p in self.attackable if p.concept == concept]
            prompts = list(dict.fromkeys(p.unsafe for p in pairs))
            self.screens[concept] = ConceptScreen(frozen_pipe, concept, pairs, self.targets, run.scales,
                                                  run.guidance(cfg.teacher_cfg))
            if r.adversarial_words:
                self.words[concept] = concept_words(self.screens[concept], r.adversarial_words)
                for p in prompts:
                    self.word_prompts[p] = [substitute(p, concept, w) for w in self.words[concept]]
            if r.adversarial_direction:
                direction = concept_direction(frozen_pipe, prompts, concept)
                with torch.no_grad():
                    encoded = prompt_features(frozen_pipe, [neutral(p, concept) for p in prompts])
                for p, f in zip(prompts, encoded):
                    self.neutral[p] = f.float().cpu()
                # Weak shifts are the neutral prompt itself ("a striped shape" + 0.1 d): trained to the anchor,
                # they would move what the model draws where no colour is named. The weakest strength of the
                # grid the frozen model reads as the concept is where the direction's conditions start.
                screen = self.screens[concept]
                readable = [s for s in DIRECTION_GRID if not r.adversarial_screen or
                            screen.draws_concept([self.neutral[p] + s * direction for p in screen.prompts])]
                if readable:
                    self.direction[concept] = direction
                    self.direction_from[concept] = readable[0]
        self.attack_seconds += time.time() - t0

    def kinds(self) -> tuple[str, ...]:
        """The kinds of adversarial condition this run trains on."""
        return ("soft_prompt",) + (("near_words",) if self.word_prompts else ()) + \
            (("concept_direction",) if self.direction else ())

    def step(self, run: ErasureRun, batch: list[PromptPair]) -> list[PromptPair]:
        """Refresh the soft-prompt attack when due; one adversarial pair (condition => safe prompt) for every
        batch pair that names its concept."""
        r = run.cfg.research
        if self.steps_taken % r.adversarial_every == 0:
            t0 = time.time()
            self._refresh(run, [p for p in batch if p in self.attackable] or self.attackable[:1])
            self.attack_seconds += time.time() - t0
        self.steps_taken += 1
        out = []
        for p in batch:
            if p in self.attackable:
                have = {"soft_prompt": p.unsafe in self.soft_names, "near_words": bool(self.word_prompts.get(p.unsafe)),
                        "concept_direction": p.concept in self.direction}
                options = [k for k in self.kinds() if have[k]]
                if options:            # none while every attack so far was screened out and nothing else is on
                    out.append(PromptPair(self._condition(options[self._draw(len(options))], p), p.safe, p.concept))
        return out

    def _draw(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def _condition(self, kind: str, pair: PromptPair) -> str:
        """The name of a fresh condition of ``kind`` built from ``pair``'s unsafe prompt."""
        prompt = pair.unsafe
        if kind == "near_words":
            choices = self.word_prompts[prompt]
            return choices[self._draw(len(choices))]
        if kind == "concept_direction":
            lo, hi = self.direction_from[pair.concept], DIRECTION_STRENGTHS[1]
            strength = lo + (hi - lo) * float(torch.rand((), generator=self.generator))
            name = f"<concept direction: {prompt}>"
            self.features[name] = self.neutral[prompt] + strength * self.direction[pair.concept]
            return name
        names = self.soft_names[prompt]
        return names[self._draw(len(names))]

    def _refresh(self, run: ErasureRun, pairs: list[PromptPair]) -> None:
        """A soft-prompt attack on the model being trained, aimed at ``pairs``' concept images; its tokens
        give every unsafe prompt of the concept a new adversarial condition."""
        r = run.cfg.research
        attacked = replace(run.pipe, transformer=run.student)
        enc = run.pipe.text_encoder
        k = self.refreshes
        self.refreshes += 1
        for concept in dict.fromkeys(p.concept for p in pairs):
            prompts = list(dict.fromkeys(p.unsafe for p in pairs if p.concept == concept))
            start = concept_embedding(enc, concept, r.adversarial_tokens)
            spread = float(concept_embedding(enc, concept, 1).std())
            noise = torch.randn(start.shape, generator=self.generator).to(start.device)
            soft, _ = optimise_soft_tokens(attacked, concept, targets_of(self.targets, prompts),
                                           start + 0.01 * spread * noise, r.adversarial_steps,
                                           r.adversarial_lr * spread, run.scales, run.guidance(run.cfg.teacher_cfg),
                                           # the attack's backward through the student is as large as training's
                                           checkpointing=run.cfg.gradient_checkpointing)
            everyone = list(dict.fromkeys(p.unsafe for p in self.attackable if p.concept == concept))
            with torch.no_grad():
                feats = dict(zip(everyone, soft_prompt_features(enc, everyone, concept, soft)))
            screen = self.screens[concept]
            if r.adversarial_screen and not screen.draws_concept([feats[p] for p in screen.prompts]):
                # The attack made the model being trained draw the concept from a condition the frozen model
                # does not read as the concept (an open colour, say): training it to the anchor would move
                # what the model draws where the concept was never named.
                self.rejected += 1
                continue
            for prompt, f in feats.items():
                name = f"<adversarial {k}: {prompt}>"
                self.features[name] = f
                kept = self.soft_names.setdefault(prompt, [])
                kept.append(name)
                while r.adversarial_keep and len(kept) > r.adversarial_keep:
                    self.features.pop(kept.pop(0), None)


class ConceptScreen:
    """Does a condition make the frozen model draw the concept? Scored on the concept's images (``targets``:
    unsafe prompt -> AuxTokens, the first ``SCREEN_IMAGES`` unsafe prompts of ``pairs``): the frozen model's
    guided cross-entropy of them under the condition, on the tokens that carry the concept (each token
    weighted by how much less likely the safe prompt makes it, so a condition that only changes the details
    counts for little), against the same under the prompts without the concept word. A condition that
    scores below that draws the concept more than saying nothing does."""

    def __init__(self, pipe, concept: str, pairs: list[PromptPair], targets: dict, scales, guidance):
        self.pipe, self.concept, self.scales, self.guidance = pipe, concept, scales, guidance
        pairs = list({p.unsafe: p for p in pairs}.values())[:SCREEN_IMAGES]
        self.prompts = [p.unsafe for p in pairs]
        self.targets = targets_of(targets, self.prompts)
        own = self._losses(self.prompts)
        self.weight = (self._losses([p.safe for p in pairs]) - own).clamp(min=0)
        self.without = self.score([neutral(p, concept) for p in self.prompts])

    def _losses(self, conditions: list) -> torch.Tensor:
        """Per-token cross-entropy (N, L); a condition is a prompt or its (L, D) features."""
        with torch.no_grad():
            if all(isinstance(c, str) for c in conditions):
                conditions = prompt_features(self.pipe, conditions)
            t = self.targets
            return token_nll(self.pipe, conditions, Targets(self.prompts, t.inputs, t.labels, t.rows), self.scales,
                             self.guidance)

    def score(self, conditions: list) -> float:
        """The weighted cross-entropy of the concept's images, one condition per screened unsafe prompt."""
        return float((self.weight * self._losses(conditions)).sum() / self.weight.sum().clamp(min=1e-12))

    def draws_concept(self, conditions: list) -> bool:
        return self.score(conditions) < self.without


def concept_words(screen: ConceptScreen, count: int) -> list[str]:
    """Of the ``count`` vocabulary words nearest the concept (attacks.near_words), those under which the
    frozen model draws the concept more than with no word at all (``screen``). Words that draw something
    else (another colour) or nothing in particular ("coloured") are left alone: training them to the
    anchor would move what the model draws for them."""
    c = screen.concept
    return [w for w in near_words(screen.pipe, c, count)
            if screen.draws_concept([substitute(p, c, w) for p in screen.prompts])]
