"""Robust S-VARE's adversarial pool (erasure/robust.py): which conditions it trains on, the near words it
mines (on the bundled toy model, where the words' meaning is real), the trainable set and the family's
robust recipe."""
from __future__ import annotations

import pytest
import torch

from svare_core.erasure import EraseConfig, erase, expand_concept, robust, with_options
from svare_core.erasure.attacks import neutral
from svare_core.erasure.trainable import dense_parameters
from svare_core.settings import resolve_erase

PAIRS = expand_concept("red", "blue", "toy")[:3]      # a red shape, a red circle, a red triangle -> blue


@pytest.fixture()
def pools(monkeypatch):
    """Every AdversarialPool a run builds."""
    made = []
    original = robust.AdversarialPool.__init__

    def init(self, run):
        original(self, run)
        made.append(self)

    monkeypatch.setattr(robust.AdversarialPool, "__init__", init)
    return made


def robust_run(pipe, **kw):
    kw = {"steps": 3, "lr": 1e-3, "robust": True, "adversarial_every": 2, "adversarial_steps": 2,
          "pairs_per_step": 3, "adversarial_screen": False, **kw}
    return erase(pipe, PAIRS, with_options(EraseConfig(), **kw))


def test_every_attack_finds_conditions_for_every_unsafe_prompt_and_they_stay(tiny_pipeline, pools):
    res = robust_run(tiny_pipeline, adversarial_words=0)
    (pool,) = pools
    assert pool.refreshes == 2                                       # steps 1 and 3
    unsafe = [p.unsafe for p in PAIRS]
    # one attack on the batch's prompts gives all three prompts a soft-prompt condition (shared tokens), and
    # the first attack's conditions are still trained after the second
    assert {p: len(pool.soft_names[p]) for p in unsafe} == {p: 2 for p in unsafe}
    assert all(name in pool.features for p in unsafe for name in pool.soft_names[p])
    assert [h["adversarial_pairs"] for h in res.history] == [3.0] * 3
    assert pool.kinds() == ("soft_prompt", "concept_direction")

    pools.clear()
    robust_run(tiny_pipeline, adversarial_words=0, adversarial_keep=1, adversarial_direction=False)
    (pool,) = pools
    assert {p: len(pool.soft_names[p]) for p in unsafe} == {p: 1 for p in unsafe}
    assert all(n.startswith("<adversarial 1:") for p in unsafe for n in pool.soft_names[p])
    assert sum(n.startswith("<adversarial") for n in pool.features) == 3      # the first attack's are gone
    assert pool.kinds() == ("soft_prompt",)


def test_attacks_whose_finds_the_frozen_model_does_not_read_as_the_concept_are_not_trained(tiny_pipeline, pools,
                                                                                          monkeypatch):
    judged, attacking = [], []
    refresh = robust.AdversarialPool._refresh

    def refreshing(self, run, pairs):
        attacking.append(True)
        refresh(self, run, pairs)
        attacking.pop()

    def draws_concept(self, conditions):
        judged.append(bool(attacking))
        return not attacking                              # the direction and the words pass, every attack's finds fail

    monkeypatch.setattr(robust.AdversarialPool, "_refresh", refreshing)
    monkeypatch.setattr(robust.ConceptScreen, "draws_concept", draws_concept)
    res = robust_run(tiny_pipeline, adversarial_words=0, adversarial_screen=True)
    (pool,) = pools
    assert pool.refreshes == 2 and pool.rejected == 2 and not pool.soft_names
    assert not any(n.startswith("<adversarial") for n in pool.features)
    assert sum(judged) == 2                                             # each attack's features were screened
    assert pool.direction_from["red"] == robust.DIRECTION_GRID[0]
    # the concept direction still gives every pair its adversarial condition
    assert [h["adversarial_pairs"] for h in res.history] == [3.0] * 3
    assert res.history[-1]["attacks_screened_out"] == 2.0
    pools.clear()
    res = robust_run(tiny_pipeline, adversarial_words=0, adversarial_direction=False, adversarial_screen=True)
    assert [h["adversarial_pairs"] for h in res.history] == [0.0] * 3      # nothing left to train on


def test_concept_direction_conditions_are_the_neutral_prompt_moved_along_the_direction(tiny_pipeline, pools):
    robust_run(tiny_pipeline, steps=1, adversarial_words=0)
    (pool,) = pools
    pair = PAIRS[1]
    name = pool._condition("concept_direction", pair)
    moved = pool.features[name] - pool.neutral[pair.unsafe]
    direction = pool.direction["red"]
    strength = float((moved[0] @ direction) / (direction @ direction))          # the same shift on every token
    lo, hi = pool.direction_from["red"], robust.DIRECTION_STRENGTHS[1]
    assert lo == robust.DIRECTION_GRID[0]                  # unscreened: the whole range
    assert lo <= strength <= hi and torch.allclose(moved, strength * direction.expand_as(moved), atol=1e-5)
    encoded = tiny_pipeline.text_encoder.encode([neutral(pair.unsafe, "red")])
    assert torch.allclose(pool.neutral[pair.unsafe], encoded[0][0, :int(encoded[1][0].sum())])


def test_near_words_are_those_the_frozen_model_draws_as_the_concept():
    """On the bundled toy model: words that make the base model's red images likelier than no colour word
    are trained to the anchor; other colours, and colour words that name none, are left alone."""
    from svare_core import load_pipeline
    from svare_core.erasure.attacks import near_words
    from svare_core.erasure.tokens import aux_settings, auxiliary_tokens, prompt_seeds

    torch.set_num_threads(2)
    toy = load_pipeline("toyworld")
    cfg = resolve_erase(toy, PAIRS)
    pairs = expand_concept("red", "blue", "toy")
    scales = toy.default_scales()
    unsafe = list(dict.fromkeys(p.unsafe for p in pairs))[:robust.SCREEN_IMAGES]
    targets = auxiliary_tokens(toy, unsafe, seeds=lambda p: prompt_seeds(p, 7, 1), settings=aux_settings(toy, cfg),
                               scales=scales)
    candidates = near_words(toy, "red", 24)
    screen = robust.ConceptScreen(toy, "red", pairs, targets, scales, cfg.teacher_cfg)
    words = robust.concept_words(screen, 24)
    assert set(words) < set(candidates)
    assert "reddish" in words
    assert not {"blue", "green", "orange", "purple", "yellow"} & set(words)
    assert {"blue", "green", "orange", "purple", "yellow"} & set(candidates)      # the screen removed them
    assert not {"colored", "colour", "colorful"} & set(words)                      # open colour: not red


def test_xattn_pool_trains_cross_attention_and_the_pooled_texts_projection(tiny_pipeline):
    names = set(dense_parameters(tiny_pipeline.transformer, "xattn_pool"))
    assert any(n.startswith("text_proj_for_sos.") for n in names)
    assert any(".ca." in n for n in names)
    assert not any(".sa." in n or ".ffn." in n or n.startswith(("text_proj_for_ca.", "text_norm.")) for n in names)
    text = set(dense_parameters(tiny_pipeline.transformer, "xattn_text"))
    assert names < text and any(n.startswith("text_norm.") for n in text)


def test_robust_erasure_takes_the_familys_robust_recipe_unless_the_user_sets_it():
    from svare_core.settings import get_family

    toy = get_family("toyworld")
    assert dict(toy.robust_erase) == {"trainable": "xattn_pool", "preserve_per_step": 4}
    plain = resolve_erase(toy, PAIRS)
    assert (plain.trainable, plain.preserve_per_step, plain.robust) == ("xattn", 1, False)
    cfg = resolve_erase(toy, PAIRS, robust=True)
    assert (cfg.trainable, cfg.preserve_per_step, cfg.robust) == ("xattn_pool", 4, True)
    two = resolve_erase(toy, PAIRS + expand_concept("star", "circle", "toy")[:2], robust=True)
    assert two.preserve_per_step == 8                                  # per concept, like the plain recipe
    mine = resolve_erase(toy, PAIRS, robust=True, trainable="xattn", preserve_per_step=2)
    assert (mine.trainable, mine.preserve_per_step) == ("xattn", 2)
    infinity = resolve_erase(get_family("infinity"), PAIRS, robust=True)       # no robust recipe of its own
    assert infinity.trainable == get_family("infinity").erase.trainable
