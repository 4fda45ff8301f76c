"""The attack harness on tiny real models (random weights, the real MiniLM encoder) with small budgets:
what each attack builds, that the optimising ones improve their objective, and the report."""
from __future__ import annotations

import json

import pytest
import torch

from svare_core.erasure import ErasurePatch, apply_patch
from svare_core.erasure.attacks import (AttackBudget, InjectedFeatures, Judge, concept_direction, concept_embedding,
                                        concept_nll, concept_targets, near_words, neutral, optimise_soft_tokens,
                                        run_attacks, soft_prompt,
                                        soft_prompt_features, substitute, vocabulary_words)
from svare_core.sampling import SamplerSettings, generate

SETTINGS = SamplerSettings(cfg=3.0, tau=1.0, top_k=0, top_p=0.0)
PROMPTS = ["a red shape", "a red circle", "a striped red shape"]


@pytest.fixture()
def erased(tiny_pipeline):
    state = tiny_pipeline.transformer.state_dict()
    patch = ErasurePatch({k: torch.randn(state[k].shape, generator=torch.Generator().manual_seed(0)) * 0.05
                          for k in state if ".ca." in k and k.endswith("weight")},
                         {"concepts": ["red"], "base_fingerprint": tiny_pipeline.base_fingerprint})
    return apply_patch(tiny_pipeline, patch)


def test_prompt_editing():
    assert substitute("a Red circle on red", "red", "crimson") == "a crimson circle on crimson"
    assert substitute("a reddish circle", "red", "x") == "a reddish circle"          # whole words only
    assert neutral("a red circle", "red") == "a circle"
    assert neutral("an orange star", "orange") == "a star"
    assert neutral("red", "red") == "a picture"


def test_near_words_come_from_the_vocabulary(text_encoder, tiny_pipeline):
    words = vocabulary_words(text_encoder.tokenizer)
    assert "crimson" in words and "red" in words and not any(w.startswith("##") for w in words)
    near = near_words(tiny_pipeline, "red", 6)
    assert len(near) == 6 and "red" not in near and all(w in words for w in near)
    # the nearest words are red's relatives (MiniLM: reddish, reds, colour words), never "red" itself
    assert {"reddish", "reds"} & set(near)


def test_injected_features_reach_the_sampler(tiny_pipeline):
    """Features given for a name draw exactly what the prompt with those features draws."""
    feats, mask = tiny_pipeline.text_encoder.encode(["a red circle"])
    injected = InjectedFeatures(tiny_pipeline.text_encoder, {"<x>": feats[0, :int(mask[0].sum())]})
    f2, m2 = injected.encode(["a blue star", "<x>"])
    plain, pm = tiny_pipeline.text_encoder.encode(["a blue star", "a red circle"])
    assert torch.equal(m2, pm) and torch.allclose(f2, plain)
    from dataclasses import replace
    a = generate(replace(tiny_pipeline, text_encoder=injected), ["<x>"], seed=3, settings=SETTINGS).images
    b = generate(tiny_pipeline, ["a red circle"], seed=3, settings=SETTINGS).images
    assert torch.equal(a, b)


def test_soft_prompt_lowers_the_objective(erased, tiny_pipeline):
    scales = tiny_pipeline.default_scales()
    targets = concept_targets(tiny_pipeline, PROMPTS, 1, SETTINGS, scales, seed=7)
    assert targets.labels.shape[0] == len(PROMPTS) and targets.rows == [0, 1, 2]
    # one soft token started at the concept's own embedding reproduces the prompt's features
    enc = erased.text_encoder
    red = enc.model.get_input_embeddings().weight[enc.tokenizer("red", add_special_tokens=False)["input_ids"]]
    same = soft_prompt_features(enc, PROMPTS, "red", red.detach())
    feats, mask = enc.encode(PROMPTS)
    assert torch.allclose(same[1], feats[1, :int(mask[1].sum())], atol=1e-4)
    feats, info = soft_prompt(erased, "red", targets, AttackBudget(soft_steps=8, soft_tokens=2), scales, 3.0)
    assert len(feats) == len(PROMPTS) and info["nll_after"] < info["nll_first_step"]
    assert float(concept_nll(erased, feats, targets, scales, 3.0)) == pytest.approx(info["nll_after"], rel=1e-4)
    with pytest.raises(ValueError, match="does not contain the concept"):
        soft_prompt_features(enc, ["a blue circle"], "red", red.detach())


def test_soft_tokens_are_the_same_with_checkpointed_blocks(erased, tiny_pipeline, monkeypatch):
    """Robust erasure attacks its student with the run's gradient checkpointing (memory at 2B); recomputing
    each block in the backward pass gives the same gradients, so the same tokens."""
    scales = tiny_pipeline.default_scales()
    targets = concept_targets(tiny_pipeline, PROMPTS, 1, SETTINGS, scales, seed=7)
    start = concept_embedding(erased.text_encoder, "red", 2)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    erased.transformer.train()           # blocks checkpoint in training mode only, as in the erasure run
    try:
        plain, h1 = optimise_soft_tokens(erased, "red", targets, start, 3, 0.05, scales, 3.0)
        checkpointed, h2 = optimise_soft_tokens(erased, "red", targets, start, 3, 0.05, scales, 3.0, checkpointing=True)
    finally:
        erased.transformer.eval()
    assert calls and h1 == h2 and torch.equal(plain, checkpointed) and h1[-1] < h1[0]


def test_concept_direction_points_from_neutral_to_concept(tiny_pipeline):
    d = concept_direction(tiny_pipeline, PROMPTS, "red")
    assert d.shape == (tiny_pipeline.text_encoder.width,) and d.norm() > 0


def test_run_attacks_report(erased, tiny_pipeline):
    budget = AttackBudget(near_words=2, word_pool=3, search_slots=2, soft_tokens=1, soft_steps=2, target_images=1,
                          direction_strengths=(1.0,), judge_seeds=1, max_prompts=2)
    judge = Judge("toyworld", "red")
    report = json.loads(json.dumps(run_attacks(tiny_pipeline, erased, "red", PROMPTS + ["a blue star"], judge,
                                               budget=budget, settings=SETTINGS)))
    assert report["prompts"] == PROMPTS[:2]                # only prompts naming the concept, at most max_prompts
    for key in ("natural_prompts", "token_search", "soft_prompt"):
        assert 0 <= report[key]["erased"] <= 1 and 0 <= report[key]["base"] <= 1
    assert report["natural_prompts"]["num_images"] == 2
    assert len(report["near_words"]["per_word"]) == 2
    assert report["near_words"]["strongest"]["word"] in report["near_words"]["words"]
    assert 1 <= len(report["token_search"]["words"]) <= 2
    assert report["concept_direction"]["neutral_prompts"] == ["a shape", "a circle"]
    with pytest.raises(ValueError, match="unknown attack"):
        run_attacks(tiny_pipeline, erased, "red", PROMPTS, judge, attacks=("nope",))
    with pytest.raises(ValueError, match="names the concept"):
        run_attacks(tiny_pipeline, erased, "red", ["a blue star"], judge, attacks=("near_words",))


def test_attack_cli(tiny_pipeline, tmp_path, capsys):
    from svare_core.__main__ import main
    from svare_core.models.format import save_model

    from conftest import TINY_SCALES

    model = save_model(tmp_path / "tiny.safetensors", transformer=tiny_pipeline.transformer, vae=tiny_pipeline.vae,
                       text_encoder="minilm", scales=TINY_SCALES)
    patch = tmp_path / "erase_red.safetensors"
    main(["erase", "--model", str(model), "--kind", "toy", "--concept", "red", "--anchor", "blue", "--steps", "1",
          "--out", str(patch)])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="--patch"):
        main(["attack", "--model", str(model), "--detector", "toyworld"])
    with pytest.raises(SystemExit, match="unknown attack"):
        main(["attack", "--model", str(model), "--patch", str(patch), "--attacks", "near_words,nope"])
    with pytest.raises(SystemExit, match="--detector"):                 # a real model names its judge
        main(["attack", "--model", str(model), "--patch", str(patch), "--attacks", "near_words"])
    out = tmp_path / "attack.json"
    main(["attack", "--model", str(model), "--patch", str(patch), "--detector", "toyworld", "--attacks",
          "near_words,concept_direction", "--near-words", "1", "--judge-seeds", "1", "--max-prompts", "2",
          "--json", str(out)])
    report = json.loads(out.read_text())["concepts"]["red"]
    assert report["prompts"] == ["a red shape", "a red circle"]        # the patch's training prompts
    assert set(report) >= {"natural_prompts", "near_words", "concept_direction"} and "soft_prompt" not in report
    assert json.loads(capsys.readouterr().out)["concepts"]["red"] == report


@pytest.fixture(scope="module")
def vq_models():
    """The embedded VQ toy model (a Switti) and a copy with its cross-attention perturbed."""
    from svare_core import load_pipeline
    vq = load_pipeline("toyworld_vq")
    state = vq.transformer.state_dict()
    g = torch.Generator().manual_seed(0)
    patch = ErasurePatch({k: torch.randn(state[k].shape, generator=g) * 0.02 for k in state
                          if ".cross_attn." in k and k.endswith("weight")},
                         {"concepts": ["red"], "base_fingerprint": vq.base_fingerprint})
    return vq, apply_patch(vq, patch)


def test_vq_conditions_from_features_match_the_prompts(vq_models):
    """A VQ model's attacked conditions: the pooled vector recomputed from features is the encoder's own, so
    features injected for a name draw what the prompt draws, and the likelihood of prompts' own features is
    the prompts' likelihood under the sampler's guidance ramp."""
    from dataclasses import replace

    from svare_core.erasure.attacks import attack_guidance, text_condition
    from svare_core.erasure.losses import guided_logits, symbol_losses
    from svare_core.sampling_vq import guidance_weight
    from svare_core.settings import resolve_sampler

    vq, _ = vq_models
    feats, mask, pooled = vq.text_encoder.encode(PROMPTS)
    ours = text_condition(vq, feats, mask)
    theirs = vq.condition(PROMPTS)
    assert torch.allclose(ours.pooled, theirs.pooled, atol=1e-6) and torch.equal(ours.context, theirs.context)
    assert torch.equal(ours.mask, theirs.mask)
    injected = InjectedFeatures(vq.text_encoder, {"<x>": feats[1, :int(mask[1].sum())]})
    f2, m2, p2 = injected.encode(["a blue star", "<x>"])
    assert torch.allclose(p2[1], pooled[1], atol=1e-6) and torch.equal(m2[1, :int(mask[1].sum())], mask[1, :int(mask[1].sum())])
    settings = resolve_sampler(vq)
    a = generate(replace(vq, text_encoder=injected), ["<x>"], seed=3, settings=settings).images
    b = generate(vq, ["a red circle"], seed=3, settings=settings).images
    assert torch.allclose(a, b, atol=1e-5)
    scales = vq.default_scales()
    ramp = attack_guidance(vq, settings, scales)
    n = len(scales)
    assert ramp.shape == (sum(h * w for h, w in scales),) and float(ramp[0]) == 1.0
    assert float(ramp[-1]) == pytest.approx(1.0 + guidance_weight(n - 1, n, settings)) and float(ramp[-1]) > 1.0
    targets = concept_targets(vq, PROMPTS, 1, settings, scales, seed=7)
    assert targets.labels.dtype == torch.long and targets.labels.shape[:2] == (len(PROMPTS), ramp.numel())
    got = concept_nll(vq, [feats[i, :int(mask[i].sum())] for i in range(len(PROMPTS))], targets, scales, ramp)
    with torch.no_grad():
        x = targets.inputs
        cond = vq.transformer(vq.condition(PROMPTS), x, scales)
        uncond = vq.transformer(vq.condition([""] * len(PROMPTS)), x, scales)
        want = symbol_losses(guided_logits(cond, uncond, ramp), targets.labels).mean()
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)


def test_vq_soft_prompt_lowers_the_objective(vq_models):
    from svare_core.erasure.attacks import attack_guidance
    from svare_core.settings import resolve_sampler

    vq, erased = vq_models
    scales, settings = vq.default_scales(), resolve_sampler(vq)
    targets = concept_targets(vq, PROMPTS, 1, settings, scales, seed=7)
    ramp = attack_guidance(vq, settings, scales)
    feats, info = soft_prompt(erased, "red", targets, AttackBudget(soft_steps=6, soft_tokens=2), scales, ramp)
    assert len(feats) == len(PROMPTS) and info["nll_after"] < info["nll_first_step"]


def test_run_attacks_on_a_vq_model(vq_models):
    vq, erased = vq_models
    budget = AttackBudget(near_words=1, word_pool=2, search_slots=1, soft_tokens=1, soft_steps=2, target_images=1,
                          direction_strengths=(1.0,), judge_seeds=1, max_prompts=2)
    report = json.loads(json.dumps(run_attacks(vq, erased, "red", PROMPTS, Judge("toyworld", "red"), budget=budget)))
    for key in ("natural_prompts", "near_words", "token_search", "soft_prompt", "concept_direction"):
        rates = report[key]["strongest"] if key == "concept_direction" else report[key]
        assert 0 <= rates["erased"] <= 1 and 0 <= rates["base"] <= 1, key
    # the oracle sees red in the base model's natural red prompts (the toy VQ model draws colour at 84%)
    assert report["natural_prompts"]["base"] > 0
    assert report["natural_prompts"]["nll_base"] > 0 and report["soft_prompt"]["nll_after"] > 0


def test_vq_model_without_a_self_pooling_encoder_is_refused_in_one_line(vq_models):
    """Switti's CLIP pair pools inside a tower: the attacks cannot rebuild its pooled vector from features."""
    from dataclasses import replace

    from svare_core.erasure.attacks import check_attackable

    class TwoTowers:
        pooling = None

        def __init__(self, encoder):
            self._encoder = encoder

        def __getattr__(self, name):
            return getattr(self._encoder, name)

    vq, _ = vq_models
    clip_like = replace(vq, text_encoder=TwoTowers(vq.text_encoder))
    with pytest.raises(ValueError, match="one-tower text encoder .* Switti's CLIP pair is not supported yet"):
        run_attacks(clip_like, clip_like, "red", PROMPTS, Judge("toyworld", "red"))
    check_attackable(vq)
    from svare_core.erasure import erase, expand_concept
    from svare_core.settings import resolve_erase
    pairs = expand_concept("red", "blue", "toy")[:1]
    with pytest.raises(ValueError, match="Switti's CLIP pair is not supported yet.*without robust"):
        erase(clip_like, pairs, resolve_erase(clip_like, pairs, steps=1, robust=True))
