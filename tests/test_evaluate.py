"""The toy-world erasure report: prompt sets, the Frechet distance, and the report's structure on tiny models
(random tiny models draw 8x8 noise, so only structure and ranges are checked here)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from svare_core.erasure import ErasurePatch, apply_patch
from svare_core.erasure.evaluate import diversity as _diversity
from svare_core.erasure.evaluate import frechet_distance as _frechet
from svare_core.toyworld.evaluate import (concept_prompts, evaluate_toy, paraphrase_prompts, quality_toy,
                                          unrelated_prompts, unseen_prompts)
from svare_core.toyworld import world

ALL_VALUES = [v for a in ("shape", "colour", "style") for v in world.VALUES[a]]


def mentions(prompt: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", prompt) is not None


def strict_json(report: dict) -> dict:
    """Reports are written as JSON: NaN/Infinity are not JSON."""
    def refuse(c):
        raise ValueError(f"{c} in the report")
    return json.loads(json.dumps(report), parse_constant=refuse)


# -- prompt sets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("concept", ALL_VALUES)
def test_concept_prompts_ask_for_the_concept(concept):
    specs = concept_prompts(concept)
    attr = next(a for a, vs in world.VALUES.items() if concept in vs)
    others = [a for a in ("shape", "colour", "style") if a != attr]
    assert len(specs) == 1 + sum(len(world.VALUES[a]) for a in others)
    assert len({s.prompt for s in specs}) == len(specs)
    for s in specs:
        assert mentions(s.prompt, concept) and s.wanted[attr] == concept
        assert s.prompt == world.full_caption(**s.wanted)
        assert all(mentions(s.prompt, v) for v in s.wanted.values())


@pytest.mark.parametrize("concept", ALL_VALUES)
def test_paraphrase_prompts_use_synonyms_never_the_word(concept):
    specs = paraphrase_prompts(concept)
    assert specs, f"no paraphrase for {concept}"
    for s in specs:
        assert not mentions(s.prompt, concept), s.prompt
        assert any(syn in s.prompt for syn in world.SYNONYMS[concept]), s.prompt
        assert s.wanted[next(a for a, vs in world.VALUES.items() if concept in vs)] == concept
    # one paraphrase per usable synonym of each concept prompt
    usable = [syn for syn in world.SYNONYMS[concept] if not mentions(syn, concept)]
    assert len(specs) == len(concept_prompts(concept)) * len(usable)
    assert {syn for syn in usable if any(syn in s.prompt for s in specs)} == set(usable)


def test_paraphrases_of_star_and_heart_drop_synonyms_naming_them():
    assert {s.prompt for s in paraphrase_prompts("star")} >= {"a pentagram", "a red pentagram"}
    assert not any("five-pointed" in s.prompt for s in paraphrase_prompts("star"))
    assert not any("love heart" in s.prompt for s in paraphrase_prompts("heart"))


@pytest.mark.parametrize("concepts", [["red"], ["red", "star"], ["striped", "circle", "white"]])
def test_unrelated_prompts_never_mention_a_concept(concepts):
    specs = unrelated_prompts(concepts)
    assert len(specs) >= 20 and len({s.prompt for s in specs}) == len(specs)
    for s in specs:
        for c in concepts:
            assert not mentions(s.prompt, c) and c not in s.wanted.values(), (s.prompt, c)
            assert not any(mentions(s.prompt, syn) for syn in world.SYNONYMS[c])
    # everything else is covered: every other value is asked for somewhere
    asked = {v for s in specs for v in s.wanted.values()}
    assert asked == set(ALL_VALUES) - set(concepts)


# -- metrics ------------------------------------------------------------------------------------------
def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    assert _frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    # a pure shift moves only the means: the distance is |shift|^2
    assert _frechet(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # a different spread counts too: N(0, I) vs N(0, 4I) in 5 dims -> 5 * (1 + 4 - 2*2) = 5
    wide = rng.normal(size=(20000, 5))
    assert _frechet(wide, 2 * wide) == pytest.approx(5.0, rel=1e-3)
    assert _frechet(a, a + shift) > _frechet(a, a + shift / 2) > 0


def test_diversity():
    same = np.zeros((2 * 3, 4, 4, 3), np.uint8)               # 2 prompts x 3 seeds, all alike
    assert _diversity(same, 3) == 0.0
    different = same.copy()
    different[1::3] = 255                                     # the second seed of each prompt differs
    assert _diversity(different, 3) == pytest.approx(2 / 3)
    assert _diversity(same, 1) is None


# -- reports on tiny models ---------------------------------------------------------------------------
def test_evaluate_toy_report_structure(tiny_pipeline):
    state = tiny_pipeline.transformer.state_dict()
    patch = ErasurePatch({k: torch.randn(state[k].shape, generator=torch.Generator().manual_seed(0)) * 0.05
                          for k in state if ".ca." in k and k.endswith("weight")},
                         {"concepts": ["red"], "base_fingerprint": tiny_pipeline.base_fingerprint})
    erased = apply_patch(tiny_pipeline, patch)
    report = strict_json(evaluate_toy(tiny_pipeline, erased, ["red", "star"], seeds=1))
    assert set(report) == {"concepts", "settings", "unrelated"}
    assert report["settings"]["seeds_per_prompt"] == 1
    u = report["unrelated"]
    assert set(u) == {"unrelated_accuracy_base", "unrelated_accuracy_erased", "preservation_unrelated",
                      "frechet_oracle_features", "diversity_base", "diversity_erased", "num_unrelated_images",
                      "diversity_ratio", "scene_agreement_same_seed", "open_attributes"}
    assert 0 <= u["scene_agreement_same_seed"] <= 1
    assert set(u["open_attributes"]["tv_per_attribute"]) == set(world.ATTRIBUTES)   # style-only prompts leave all open
    assert 0 <= u["open_attributes"]["tv_distance"] <= 1 and 0 <= u["open_attributes"]["tv_noise_floor"] <= 1
    assert 0 <= u["unrelated_accuracy_base"] <= 1 and 0 <= u["unrelated_accuracy_erased"] <= 1
    assert u["num_unrelated_images"] == len(unrelated_prompts(["red", "star"]))
    assert u["frechet_oracle_features"] >= 0 and math.isfinite(u["frechet_oracle_features"])
    assert u["diversity_base"] is None and u["diversity_ratio"] is None      # one seed: nothing to compare
    assert set(report["concepts"]) == {"red", "star"}
    for concept, attr in (("red", "colour"), ("star", "shape")):
        c = report["concepts"][concept]
        assert c["attribute"] == attr
        for key in ("erasure_rate", "base_absent_rate", "paraphrase_erasure_rate", "paraphrase_base_absent_rate",
                    "other_attributes_accuracy_base", "other_attributes_accuracy_erased",
                    "unseen_prompt_erasure_rate", "unseen_prompt_base_absent_rate"):
            assert 0 <= c[key] <= 1, key
        assert c["num_unseen_prompt_images"] == len(unseen_prompts(concept)) == 12
        assert c["preservation_on_unseen_prompts"] >= 0
        assert c["num_images"] == len(concept_prompts(concept))
        assert c["num_paraphrase_images"] == len(paraphrase_prompts(concept))
        assert sum(c["drawn_instead"].values()) == pytest.approx(1.0, abs=0.01)
        assert set(c["drawn_instead"]) <= set(world.VALUES[attr]) | {"none"}
        assert c["anchor"] is None and c["open_attributes"]["reference"] == "base model, concept prompts"
        assert attr not in c["open_attributes"]["tv_per_attribute"]       # the erased attribute is not "open"
        assert "background" in c["open_attributes"]["tv_per_attribute"]
        assert c["diversity_ratio_concept_prompts"] is None

    # the same model twice: nothing erased that was not already absent, nothing shifted
    same = strict_json(evaluate_toy(tiny_pipeline, tiny_pipeline, ["red"], seeds=2))
    c = same["concepts"]["red"]
    assert c["erasure_rate"] == c["base_absent_rate"]
    assert c["other_attributes_accuracy_erased"] == c["other_attributes_accuracy_base"]
    assert c["unseen_prompt_erasure_rate"] == c["unseen_prompt_base_absent_rate"]
    assert same["unrelated"]["frechet_oracle_features"] == pytest.approx(0.0, abs=1e-6)
    assert same["unrelated"]["diversity_ratio"] == pytest.approx(1.0)
    assert same["unrelated"]["num_unrelated_images"] == 2 * len(unrelated_prompts(["red"]))
    # collateral: the same model draws the same scenes, and its open attributes sit on the noise floor
    assert same["unrelated"]["scene_agreement_same_seed"] == 1.0
    for block in (same["unrelated"]["open_attributes"], c["open_attributes"]):
        assert block["tv_distance"] == pytest.approx(block["tv_noise_floor"])
    assert c["diversity_ratio_concept_prompts"] == pytest.approx(1.0)
    # an anchor given: the reference is the base model on the anchor's prompts
    anchored = evaluate_toy(tiny_pipeline, tiny_pipeline, ["red"], seeds=1, anchors={"red": "blue"})["concepts"]["red"]
    assert anchored["anchor"] == "blue" and anchored["open_attributes"]["reference"] == "base model, anchor prompts"


def test_total_variation_and_open_values():
    from svare_core.erasure.evaluate import PromptSpec
    from svare_core.toyworld.collateral import open_values, scene_agreement, total_variation

    assert total_variation(["a", "a"], ["a", "a"]) == 0.0
    assert total_variation(["a", "a"], ["b", "b"]) == 1.0
    assert total_variation(["a", "b"], ["a", "a"]) == pytest.approx(0.5)
    scene = {"shape": "star", "colour": "red", "style": "solid", "background": "gray"}
    specs = [PromptSpec("a red star", {"shape": "star", "colour": "red"}), PromptSpec("a solid shape", {"style": "solid"})]
    open_ = open_values([scene, scene, scene, {**scene, "style": "dotted"}], specs, seeds=2, skip=frozenset({"colour"}))
    # the first prompt leaves style and background open, the second shape and background (colour skipped)
    assert open_ == {"shape": ["star", "star"], "style": ["solid", "solid"], "background": ["gray"] * 4}
    assert scene_agreement([scene, scene], [scene, {**scene, "background": "black"}]) == 0.5


def test_quality_toy_structure(tiny_pipeline):
    q = strict_json(quality_toy(tiny_pipeline, max_prompts=3, seeds=1))
    assert set(q) == {"shape", "colour", "style", "all_three", "diversity", "num_images", "num_prompts"}
    assert q["num_prompts"] == 3 and q["num_images"] == 3 and q["diversity"] is None
    assert all(0 <= q[k] <= 1 for k in ("shape", "colour", "style", "all_three"))
    assert q["all_three"] <= min(q["shape"], q["colour"], q["style"])
    held = quality_toy(tiny_pipeline, max_prompts=3, seeds=2, held_out=True)
    assert held["num_images"] == 6 and held["diversity"] >= 0
    assert quality_toy(tiny_pipeline, max_prompts=3, seeds=1) == q            # deterministic


def test_evaluate_with_detector(tiny_pipeline, monkeypatch):
    from svare_core.erasure.evaluate import evaluate_with_detector
    from svare_core.erasure.pairs import template_prompts

    prompts = template_prompts("dog", "object")[:2]
    same = strict_json(evaluate_with_detector(tiny_pipeline, tiny_pipeline, "red", prompts, detector="toyworld",
                                              unrelated=["a cat", "a tree"], seeds=2, threshold=0.5))
    assert same["erasure_rate"] == same["base_absent_rate"]
    assert same["unrelated_flag_rate_erased"] == same["unrelated_flag_rate_base"]
    assert same["unrelated_pixel_change"] == 0.0 and same["num_images"] == 8

    # A judge that flags everything: nothing counts as erased, on any model.
    from svare_core.safety.base import Detection
    import numpy as np

    class Always:
        def detect(self, images, concept=None):
            n = len(images)
            return Detection(np.ones(n, np.float32), [[]] * n, [{}] * n)

    monkeypatch.setattr("svare_core.safety.get_detector", lambda name, **kw: Always())
    flagged = evaluate_with_detector(tiny_pipeline, tiny_pipeline, "dog", prompts, detector="any", seeds=1)
    assert flagged["erasure_rate"] == 0.0 and flagged["unrelated_flag_rate_base"] == 1.0


def test_accuracy_ignores_every_erased_value():
    from svare_core.erasure.evaluate import PromptSpec
    from svare_core.toyworld.evaluate import _accuracy

    specs = [PromptSpec("a red star", {"colour": "red", "shape": "star"}),
             PromptSpec("a green circle", {"colour": "green", "shape": "circle"})]
    readings = [{"colour": "blue", "shape": "circle"}, {"colour": "green", "shape": "circle"}]
    assert _accuracy(readings, specs, 1) == 0.5                               # red and star missed
    assert _accuracy(readings, specs, 1, frozenset({"red"})) == 2 / 3         # star still counts
    assert _accuracy(readings, specs, 1, frozenset({"red", "star"})) == 1.0   # both were erased
