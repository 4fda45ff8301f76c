"""The erasure trainer on a tiny real model: methods, trainable sets, the patch it returns, guards, caching,
determinism, and a behaviour check that S-VARE erases while keeping the safe prompt's behaviour."""
from __future__ import annotations

import math
import re

import pytest
import copy

import torch

import svare_core
from svare_core.erasure import EraseConfig, apply_patch, erase, expand_concept, losses, trainer, with_options
from svare_core.erasure.run import ErasureRun
from svare_core.erasure import tokens as tokens_module
from svare_core.erasure.tokens import auxiliary_tokens, prompt_seeds
from svare_core.erasure.trainable import DENSE_SETS, LORA_TARGETS
from svare_core.models.infinity import Infinity
from svare_core.models.vae import BSQVAE
from svare_core.pipeline import VARPipeline
from svare_core.sampling import SamplerSettings, generate

from conftest import TINY_SCALES, randomise, tiny_transformer_config, tiny_vae_config

PAIRS = expand_concept("red", "blue", "toy")[:2]           # a red shape -> a blue shape, a red circle -> a blue circle
L = sum(h * w for h, w in TINY_SCALES)
PROBE_PROMPTS = ["a red star", "a green heart"]
PROBE_X = torch.randn(2, L - 1, 8, generator=torch.Generator().manual_seed(5))


def run(pipe, pairs=PAIRS, **kw):
    kw = {"steps": 2, "lr": 1e-3, **kw}
    return erase(pipe, pairs, with_options(EraseConfig(), **kw))


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


@pytest.fixture()
def spy(monkeypatch):
    """What the trainer trained, captured just before it turns the student into a patch."""
    seen = {}
    original = trainer._make_patch

    def make_patch(run, *args, **kw):
        with torch.no_grad():
            cond = run.student.encode_text(*run.pipe.encode_prompts(PROBE_PROMPTS))
            seen["logits"] = run.student(cond, PROBE_X, TINY_SCALES)
            seen["params"] = {n: p.detach().clone() for n, p in run.params.items()}
            seen["base"] = {n: p.detach().clone() for n, p in run.frozen.named_parameters()}
        return original(run, *args, **kw)

    monkeypatch.setattr(trainer, "_make_patch", make_patch)
    return seen


def probe_logits(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(pipe.condition(PROBE_PROMPTS), PROBE_X, TINY_SCALES)


# -- methods and trainable sets ------------------------------------------------------------------------
@pytest.mark.parametrize("method, keys", [("svare", {"erase", "preserve", "kept_tokens"}),
                                          ("vare", {"erase"}), ("esd", {"esd"})])
def test_methods_train_the_dense_xattn_ffn_set(tiny_pipeline, spy, method, keys):
    before = state_copy(tiny_pipeline.transformer)
    steps = []
    res = erase(tiny_pipeline, PAIRS, EraseConfig(method=method, steps=3, lr=1e-3), callback=steps.append)
    patch = res.patch

    expected = {n for n, _ in tiny_pipeline.transformer.named_parameters() if re.match(DENSE_SETS["xattn_ffn"], n)}
    assert expected and set(patch.tensors) == expected == set(spy["params"])
    for name, delta in patch.tensors.items():
        assert re.match(r"block_chunks\.\d+\.module\.\d+\.(ca|ffn)\.", name)
        assert ".sa." not in name and "ada" not in name and not name.startswith(("head", "word_embed"))
        assert delta.shape == before[name].shape and delta.dtype == torch.float32
        # exactly the trained tensor minus the base tensor
        assert torch.equal(delta, spy["params"][name] - spy["base"][name])
        assert delta.abs().max() > 0, f"{name} did not train"
    # the patch turns the base into the trained model
    torch.testing.assert_close(probe_logits(apply_patch(tiny_pipeline, patch)), spy["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(probe_logits(tiny_pipeline), spy["logits"])

    assert [s.step for s in steps] == [1, 2, 3] and all(s.total == 3 for s in steps)
    assert [set(h) - {"step"} for h in res.history] == [keys] * 3
    assert all(math.isfinite(v) for h in res.history for v in h.values())
    meta = patch.meta
    assert meta["method"] == method and meta["steps"] == 3 and meta["concepts"] == ["red"]
    assert meta["base_fingerprint"] == tiny_pipeline.base_fingerprint and meta["lora_scale"] == 1.0
    assert meta["pairs"] == [[p.unsafe, p.safe] for p in PAIRS]
    assert meta["scales"] == [list(s) for s in TINY_SCALES]
    assert meta["hyperparameters"]["lr"] == 1e-3
    assert_same_state(before, tiny_pipeline.transformer.state_dict())


def test_lora_rank_2_patch_holds_only_the_factors(tiny_pipeline, spy):
    before = state_copy(tiny_pipeline.transformer)
    patch = run(tiny_pipeline, trainable="lora", lora_rank=2, steps=3).patch
    targets = {f"{n}.weight" for n, m in tiny_pipeline.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("block_chunks.") and n.endswith(LORA_TARGETS["attn"])}
    assert len(targets) == 2 * len(LORA_TARGETS["attn"])          # 2 blocks
    assert set(patch.tensors) == {t + s for t in targets for s in (".lora_A", ".lora_B")} == set(spy["params"])
    for t in targets:
        A, B = patch.tensors[t + ".lora_A"], patch.tensors[t + ".lora_B"]
        out_f, in_f = before[t].shape
        assert A.shape == (2, in_f) and B.shape == (out_f, 2)
        assert torch.equal(A, spy["params"][t + ".lora_A"]) and torch.equal(B, spy["params"][t + ".lora_B"])
        assert B.abs().max() > 0, "B starts at zero and must have trained"
    assert patch.meta["lora_scale"] == 1.0                        # alpha = rank
    assert set(patch.deltas()) == targets
    torch.testing.assert_close(probe_logits(apply_patch(tiny_pipeline, patch)), spy["logits"], rtol=0, atol=1e-5)
    assert_same_state(before, tiny_pipeline.transformer.state_dict())
    # the original modules were never parametrised
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in tiny_pipeline.transformer.modules())


def test_lora_targets_pick_the_layers(tiny_pipeline):
    patch = run(tiny_pipeline, trainable="lora", lora_rank=1, lora_targets="xattn_out").patch
    assert {n.rsplit(".", 2)[0] for n in patch.tensors} == {"block_chunks.0.module.0.ca.proj", "block_chunks.1.module.0.ca.proj"}


@pytest.mark.parametrize("trainable, pattern", [("xattn", r".*\.ca\."), ("xattn_kv", r".*\.ca\.(mat_kv\.weight|v_bias)$")])
def test_cross_attention_sets_train_only_their_tensors(tiny_pipeline, trainable, pattern):
    patch = run(tiny_pipeline, trainable=trainable).patch
    names = {n for n, _ in tiny_pipeline.transformer.named_parameters() if n.startswith("block_chunks.")}
    expected = {n for n in names if re.match(pattern, n)}
    assert expected and set(patch.tensors) == expected
    if trainable == "xattn_kv":      # the text side only: queries and output projection stay
        assert not any("mat_q" in n or "proj" in n for n in patch.tensors)
    assert all(d.abs().max() > 0 for d in patch.tensors.values())


def test_preserve_per_step_sets_the_preservation_batch(tiny_pipeline, monkeypatch):
    batches = []
    original = ErasureRun.on_samples

    def recording(self, prompts, *args, **kw):
        batches.append(list(prompts))
        return original(self, prompts, *args, **kw)

    monkeypatch.setattr(ErasureRun, "on_samples", recording)
    preserve = ["a green heart", "a yellow square", "a white circle"]
    safe = [p.safe for p in PAIRS]
    for k, expected_extra in ((0, 0), (2, 2), (5, 3)):
        batches.clear()
        erase(tiny_pipeline, PAIRS, EraseConfig(steps=2, lr=1e-3, preserve_per_step=k), preserve_prompts=preserve)
        assert len(batches) == 2
        for b in batches:
            extra = [q for q in b if q not in safe]
            assert len(b) == 2 + expected_extra and len(set(extra)) == expected_extra and set(extra) <= set(preserve)
    # per concept: two concepts in one run draw twice as many (untagged pairs count as one concept)
    two = expand_concept("red", "blue", "toy")[:1] + expand_concept("star", "circle", "toy")[:1]
    batches.clear()
    from svare_core.settings import resolve_erase
    config = resolve_erase(tiny_pipeline, two, steps=1, lr=1e-3, preserve_per_step=1, trainable="xattn_ffn",
                           precision="fp32", gradient_checkpointing=False)
    erase(tiny_pipeline, two, config, preserve_prompts=preserve)
    assert len(batches[0]) == len(two) + 2
    with pytest.raises(ValueError, match="preserve_per_step"):
        EraseConfig(preserve_per_step=-1).validate()


def test_supervised_scales_first(tiny_pipeline):
    res = run(tiny_pipeline, supervised_scales="first", steps=3)
    # 2 pairs a step, one token at scale 0 each: the kept share is 0, 1/2 or 1
    assert all(h["kept_tokens"] in (0.0, 0.5, 1.0) for h in res.history)
    assert any(d.abs().max() > 0 for d in res.patch.tensors.values())
    assert res.patch.meta["hyperparameters"]["supervised_scales"] == "first"


def test_erase_works_under_inference_mode(text_encoder):
    # ComfyUI loads models and runs every node under torch.inference_mode().
    with torch.inference_mode():
        transformer = randomise(Infinity(tiny_transformer_config())).eval()
        vae = randomise(BSQVAE(tiny_vae_config()), seed=1).eval()
        pipe = VARPipeline(transformer, vae, text_encoder, name="tiny", scales=list(TINY_SCALES))
        assert next(pipe.transformer.parameters()).is_inference()
        generate(pipe, [p.unsafe for p in PAIRS] + [p.safe for p in PAIRS])   # prompts cached under inference mode
        for kw in ({}, {"trainable": "lora", "lora_rank": 2}):
            patch = run(pipe, **kw).patch
            assert all(not t.is_inference() for t in patch.tensors.values())
            assert any(t.abs().max() > 0 for t in patch.tensors.values())
            erased = apply_patch(pipe, patch)
            assert generate(erased, ["a red star"]).images.shape == (1, 8, 8, 3)


# -- the iteration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, weight, calls, keys", [("svare", 0.5, 6, {"erase", "preserve", "kept_tokens"}),
                                                         ("svare", 0.0, 3, {"erase", "kept_tokens"}),
                                                         ("vare", 0.5, 3, {"erase"})])
def test_svare_steps_twice_per_iteration(tiny_pipeline, monkeypatch, method, weight, calls, keys):
    seen = []
    original = ErasureRun.optimize

    def counted(self, loss):
        seen.append(loss.detach().clone())
        return original(self, loss)

    monkeypatch.setattr(ErasureRun, "optimize", counted)
    res = run(tiny_pipeline, method=method, steps=3, preservation_weight=weight)
    assert len(seen) == calls
    assert all(set(h) - {"step"} == keys for h in res.history)
    if calls == 6:   # erase, preserve, erase, preserve, ...: separate backward + step each
        assert [h["erase"] for h in res.history] == pytest.approx([s.item() for s in seen[0::2]])
        assert [h["preserve"] for h in res.history] == pytest.approx([s.item() for s in seen[1::2]])


@pytest.fixture()
def drawn(monkeypatch):
    """What the frozen model is asked to draw auxiliary tokens for: prompts, and the CFG of each call."""
    seen = {"prompts": [], "cfg": []}
    original = tokens_module.generate

    def recording(pipe, prompts, settings, **kw):
        seen["prompts"].extend(prompts)
        seen["cfg"].append(settings.cfg)
        return original(pipe, prompts, settings=settings, **kw)

    monkeypatch.setattr(tokens_module, "generate", recording)
    return seen


def test_preservation_uses_the_preserve_prompts(tiny_pipeline, drawn):
    res = erase(tiny_pipeline, PAIRS, EraseConfig(steps=2, lr=1e-3), preserve_prompts=["a green heart", "a green heart"])
    assert sorted(drawn["prompts"]) == sorted([p.safe for p in PAIRS] + ["a green heart"])
    assert res.patch.meta["preserve_prompts"] == ["a green heart"]


@pytest.mark.parametrize("preserve_cfg, expected", [(None, 3.0), (1.0, 1.0), (2.5, 2.5)])
def test_preserve_cfg_sets_only_the_preservation_teacher(tiny_pipeline, monkeypatch, drawn, preserve_cfg, expected):
    guidance = []
    original = ErasureRun.frozen_logits

    def guided(self, prompts, x, cfg_scale, tau=1.0):
        guidance.append(cfg_scale)
        return original(self, prompts, x, cfg_scale, tau)

    monkeypatch.setattr(ErasureRun, "frozen_logits", guided)
    run(tiny_pipeline, teacher_cfg=3.0, preserve_cfg=preserve_cfg)
    assert guidance and set(guidance) == {expected}
    assert drawn["cfg"] and set(drawn["cfg"]) == {3.0}, "the auxiliary tokens keep the teacher's CFG"


@pytest.mark.parametrize("student_cfg", [1.0, 3.0])
def test_student_cfg_puts_the_losses_on_the_guided_logits(tiny_pipeline, monkeypatch, student_cfg):
    calls = []
    original = ErasureRun.student_logits

    def recording(self, prompts, x, guidance):
        out = original(self, prompts, x, guidance)
        calls.append((list(prompts), x.clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(ErasureRun, "student_logits", recording)
    run(tiny_pipeline, steps=1, student_cfg=student_cfg)
    assert len(calls) == 2                       # the erase pass, then the preservation pass
    prompts, x, seen = calls[0]                  # before the first update the student is the base model
    assert prompts == [p.unsafe for p in PAIRS]
    base = tiny_pipeline.transformer
    with torch.no_grad():
        feats, mask = tiny_pipeline.encode_prompts(prompts)
        cond = base(base.encode_text(feats, mask), x, TINY_SCALES)
        uncond = base(base.encode_text(base.uncond_features(mask), mask), x, TINY_SCALES)
    expected = cond if student_cfg == 1.0 else student_cfg * cond + (1 - student_cfg) * uncond
    torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"method": "vare"}, {"method": "svare", "preservation_weight": 0.0},
                                {"method": "svare", "preserve_per_step": 0}])
def test_no_preservation_targets_without_the_preservation_loss(tiny_pipeline, drawn, kw):
    res = erase(tiny_pipeline, PAIRS, EraseConfig(steps=2, lr=1e-3, **kw), preserve_prompts=["a green heart"])
    assert sorted(drawn["prompts"]) == sorted(p.safe for p in PAIRS)
    assert res.patch.meta["preserve_prompts"] == []


def test_callback_cancel_stops_training(tiny_pipeline):
    seen = []

    def cb(step):
        seen.append(step.step)
        if step.step == 2:
            raise svare_core.Cancelled("stop")

    with pytest.raises(svare_core.Cancelled):
        erase(tiny_pipeline, PAIRS, EraseConfig(steps=50, lr=1e-3), callback=cb)
    assert seen == [1, 2]


def nan_filtered_ce(logits, labels, **kw):
    return logits.sum() * float("nan"), 1.0


def test_nan_guard_gives_up_with_advice(tiny_pipeline, monkeypatch):
    monkeypatch.setattr(losses, "filtered_ce", nan_filtered_ce)
    seen = []
    with pytest.raises(FloatingPointError, match=r"3 steps in a row.*lower the learning rate \(now 0.001\)"):
        erase(tiny_pipeline, PAIRS, with_options(EraseConfig(), steps=20, lr=1e-3, max_bad_steps=3, preservation_weight=0),
              callback=seen.append)
    assert len(seen) == 2


@pytest.mark.parametrize("bad_loss", ["nan_loss", "nan_gradient"])
def test_non_finite_steps_change_nothing(tiny_pipeline, monkeypatch, bad_loss):
    def nan_gradient(logits, labels, **kw):
        # a finite loss (0) whose gradient is not: d sqrt(x)/dx at 0 is inf, times 0 -> nan
        return torch.sqrt(logits.sum() * 0), 1.0

    calls = []

    def bad_then_zero(logits, labels, **kw):
        # Two bad steps, then a finite one with zero gradient (and no weight decay): it moves nothing
        # either, so any change would come from the bad steps.
        calls.append(1)
        if len(calls) <= 2:
            return (nan_filtered_ce if bad_loss == "nan_loss" else nan_gradient)(logits, labels)
        return logits.sum() * 0, 1.0

    monkeypatch.setattr(losses, "filtered_ce", bad_then_zero)
    res = run(tiny_pipeline, steps=3, max_bad_steps=10, preservation_weight=0, weight_decay=0.0)
    assert len(res.history) == 3
    assert all(torch.count_nonzero(t) == 0 for t in res.patch.tensors.values()), "a non-finite step moved weights"
    # a run that ends on a non-finite step has diverged: nothing comes out
    monkeypatch.setattr(losses, "filtered_ce", nan_filtered_ce if bad_loss == "nan_loss" else nan_gradient)
    with pytest.raises(FloatingPointError, match="last step gave a non-finite loss"):
        run(tiny_pipeline, steps=3, max_bad_steps=10, preservation_weight=0)


def test_an_occasional_bad_step_is_skipped_not_fatal(tiny_pipeline, monkeypatch):
    original, calls = losses.filtered_ce, []

    def every_other(logits, labels, **kw):
        calls.append(1)
        return nan_filtered_ce(logits, labels) if len(calls) % 2 else original(logits, labels, **kw)

    monkeypatch.setattr(losses, "filtered_ce", every_other)
    res = run(tiny_pipeline, steps=4, max_bad_steps=2, preservation_weight=0)
    erase_losses = [h["erase"] for h in res.history]
    assert math.isnan(erase_losses[0]) and math.isfinite(erase_losses[1])
    assert any(t.abs().max() > 0 for t in res.patch.tensors.values())


# -- several concepts, caching, determinism, configuration ---------------------------------------------
def test_several_concepts_in_one_run(tiny_pipeline):
    pairs = PAIRS + expand_concept("circle", "square", "toy")[:2]
    patch = run(tiny_pipeline, pairs=pairs, pairs_per_step=4).patch
    assert patch.concepts == ["circle", "red"]
    assert len(patch.meta["pairs"]) == 4


def test_aux_token_cache(tiny_pipeline, tmp_path, monkeypatch):
    cache = tmp_path / "aux"
    first = run(tiny_pipeline, cache_dir=str(cache))
    files = set(cache.glob("*.safetensors"))
    assert len(files) == len(PAIRS)                       # one per (safe prompt, seed)
    assert not list(cache.glob("*.tmp"))

    seeds = prompt_seeds(PAIRS[0].safe, 0, 1)             # the seed the run drew it with
    cached = auxiliary_tokens(tiny_pipeline, [PAIRS[0].safe], seeds=seeds, cache_dir=cache, scales=TINY_SCALES,
                              settings=SamplerSettings(cfg=4.0, tau=1.0, top_p=0.97))[PAIRS[0].safe]
    assert cached.labels.shape == (1, L, 8) and cached.inputs.shape == (1, L - 1, 8)

    def no_generation(*a, **kw):
        raise AssertionError("the auxiliary tokens should have come from the cache")

    monkeypatch.setattr(tokens_module, "generate", no_generation)
    second = run(tiny_pipeline, cache_dir=str(cache))
    for k in first.patch.tensors:
        assert torch.equal(first.patch.tensors[k], second.patch.tensors[k]), "cached tokens differ from generated ones"
    # keyed by seed, prompt and sampler settings: these need new images
    for kw in ({"seed": 1}, {"teacher_cfg": 2.0}):
        with pytest.raises(AssertionError, match="cache"):
            run(tiny_pipeline, cache_dir=str(cache), **kw)
    with pytest.raises(AssertionError, match="cache"):
        run(tiny_pipeline, pairs=[expand_concept("red", "green", "toy")[0]], cache_dir=str(cache))
    monkeypatch.undo()
    run(tiny_pipeline, cache_dir=str(cache), seed=1)
    run(tiny_pipeline, pairs=[expand_concept("red", "green", "toy")[0]], cache_dir=str(cache))
    assert len(set(cache.glob("*.safetensors")) - files) == len(PAIRS) + 1
    # a different model (another fingerprint) does not reuse them either
    other = tiny_pipeline.with_transformer(randomise(Infinity(tiny_transformer_config()), seed=9).eval())
    other.base_fingerprint = other.fingerprint()
    n = len(list(cache.glob("*.safetensors")))
    run(other, cache_dir=str(cache))
    assert len(list(cache.glob("*.safetensors"))) == n + len(PAIRS)


@pytest.mark.parametrize("kw", [{}, {"trainable": "lora", "lora_rank": 2}, {"method": "esd"}])
def test_training_is_deterministic(tiny_pipeline, kw):
    a, b, c = run(tiny_pipeline, **kw).patch, run(tiny_pipeline, **kw).patch, run(tiny_pipeline, seed=3, **kw).patch
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_gradient_checkpointing_is_used_and_exact(tiny_pipeline, monkeypatch):
    plain = run(tiny_pipeline).patch
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    ckpt = run(tiny_pipeline, gradient_checkpointing=True).patch
    assert len(calls) == 2 * 2 * 2, "2 blocks x (erase + preserve pass) x 2 steps"
    for k in plain.tensors:
        torch.testing.assert_close(ckpt.tensors[k], plain.tensors[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kw, match", [({"method": "uce"}, "unknown method 'uce'"),
                                       ({"supervised_scales": "last"}, "supervised_scales"),
                                       ({"steps": 0}, "positive"), ({"lr": 0.0}, "positive"),
                                       ({"pairs_per_step": 0}, "positive"), ({"precision": "fp8"}, "precision"),
                                       ({"student_cfg": 0.0}, "student_cfg")])
def test_config_validation(tiny_pipeline, monkeypatch, kw, match):
    with pytest.raises(ValueError, match=match):
        with_options(EraseConfig(), **kw).validate()
    monkeypatch.setattr(tokens_module, "generate", lambda *a, **k: pytest.fail("validated too late"))
    with pytest.raises(ValueError, match=match):
        erase(tiny_pipeline, PAIRS, with_options(EraseConfig(), **kw))
    EraseConfig().validate()


@pytest.mark.parametrize("kw, match", [({"trainable": "everything"}, "unknown trainable set"),
                                       ({"trainable": "lora", "lora_targets": "mlp"}, "unknown LoRA targets"),
                                       ({"trainable": "lora", "lora_rank": 0}, "rank")])
def test_bad_trainable_sets(tiny_pipeline, monkeypatch, kw, match):
    with pytest.raises(ValueError, match=match):
        EraseConfig(**kw).validate()
    # refused before the (slow, on a real model) auxiliary-token generation
    monkeypatch.setattr(tokens_module, "generate", lambda *a, **k: pytest.fail("validated too late"))
    with pytest.raises(ValueError, match=match):
        run(tiny_pipeline, **kw)


# -- behaviour: S-VARE erases, and keeps the safe prompt's behaviour -----------------------------------
def test_svare_erases_the_pair_and_preserves_the_safe_prompt(tiny_pipeline):
    """After S-VARE, the unsafe prompt draws the auxiliary (safe) bits much more often, while the model on
    the safe prompt stays at its teacher; naive VARE (no filter, no preservation) lets the safe prompt drift.

    Measured on this model and seed (30 steps, lr 3e-3): filtered CE of the auxiliary bits under the
    unsafe prompt 0.60 -> 0.26, bit accuracy 0.63 -> 0.79; KL(CFG teacher || model) on the safe prompt
    0.060 (the base model itself: the conditional/CFG gap) -> 0.009 with S-VARE, 0.118 with VARE; KL to the
    base model's own conditional on the safe prompt 0.059 (S-VARE, the pull towards its CFG teacher) vs
    0.146 (VARE). The bounds below leave about 1.5-3x margin."""
    pipe, scales = tiny_pipeline, TINY_SCALES
    settings = SamplerSettings(cfg=4.0, tau=1.0, top_p=0.97)      # the trainer's teacher sampling (defaults)
    # measured on the first training image of each safe prompt (the run draws them with the prompt's own seeds)
    aux = auxiliary_tokens(pipe, [p.safe for p in PAIRS], seeds=lambda prompt: prompt_seeds(prompt, 0, 1),
                           settings=settings, scales=scales)
    x = torch.cat([aux[p.safe].inputs for p in PAIRS])
    y = torch.cat([aux[p.safe].labels for p in PAIRS])
    unsafe, safe = [p.unsafe for p in PAIRS], [p.safe for p in PAIRS]

    @torch.no_grad()
    def logits(model, prompts):
        return model(model.encode_text(*pipe.encode_prompts(prompts)), x, scales)

    base = pipe.transformer
    with torch.no_grad():                                       # the CFG-guided teacher of L_Pre
        feats, mask = pipe.encode_prompts(safe)
        teacher = losses.guided_logits(base(base.encode_text(feats, mask), x, scales),
                                       base(base.encode_text(base.uncond_features(mask), mask), x, scales), 4.0, 1.0)
    base_safe = logits(pipe.transformer, safe)

    def measure(model):
        u = logits(model, unsafe)
        fce, kept = losses.filtered_ce(u, y)
        s = logits(model, safe)
        return {"fce": fce.item(), "kept": kept, "acc": ((u[..., 1] > u[..., 0]).float() == y).float().mean().item(),
                "kl_teacher": losses.preservation_kl(s, teacher).item(),
                "kl_base": losses.preservation_kl(s, base_safe).item()}

    before = measure(pipe.transformer)
    svare = measure(apply_patch(pipe, run(pipe, steps=30, lr=3e-3).patch).transformer)
    vare = measure(apply_patch(pipe, run(pipe, method="vare", steps=30, lr=3e-3).patch).transformer)

    # erased: the S-VARE erase loss on the pair falls by more than 40% (measured 57%) ...
    assert svare["fce"] < 0.6 * before["fce"], (before, svare)
    assert svare["acc"] > before["acc"] + 0.08 and svare["kept"] < before["kept"] - 0.2
    # ... about as much as naive VARE erases
    assert svare["fce"] < 1.5 * vare["fce"]
    # preserved: the safe prompt stays at (here: moves towards) the CFG teacher that L_Pre compares with,
    assert svare["kl_teacher"] < 0.5 * before["kl_teacher"] and svare["kl_teacher"] < 0.03, (before, svare)
    # while naive VARE drifts away from it and from the base model
    assert vare["kl_teacher"] > before["kl_teacher"] and vare["kl_teacher"] > 3 * svare["kl_teacher"], (vare, svare)
    assert svare["kl_base"] < 0.1 and svare["kl_base"] < 0.6 * vare["kl_base"], (svare, vare)


def test_student_shares_untouched_weights(tiny_pipeline):
    from svare_core.erasure.trainer import _student_copy

    frozen = tiny_pipeline.transformer
    student = _student_copy(frozen, EraseConfig(trainable="xattn_ffn"))
    f, s = frozen.state_dict(), student.state_dict()
    trained = [k for k, _ in frozen.named_parameters() if k.startswith("block_chunks.") and (".ca." in k or ".ffn." in k)]
    assert trained and all(s[k].data_ptr() != f[k].data_ptr() for k in trained)
    assert all(s[k].data_ptr() == f[k].data_ptr() for k in f if k not in trained)
    lora_student = _student_copy(frozen, EraseConfig(trainable="lora"))
    assert all(v.data_ptr() == f[k].data_ptr() for k, v in lora_student.state_dict().items())


def test_student_copies_inference_tensors(tiny_pipeline):
    from svare_core.erasure.trainer import _student_copy

    with torch.inference_mode():
        frozen = copy.deepcopy(tiny_pipeline.transformer)
        frozen.load_state_dict({k: v.clone() for k, v in frozen.state_dict().items()})
    assert next(iter(frozen.state_dict().values())).is_inference()
    student = _student_copy(frozen, EraseConfig(trainable="lora"))
    assert not any(v.is_inference() for v in student.state_dict().values())


def test_an_erasure_run_encodes_each_prompt_once(tiny_pipeline, monkeypatch):
    """Flan-T5-XL is slow: the features of every prompt of a run are computed once and reused."""
    seen: list[str] = []
    real = type(tiny_pipeline.text_encoder)._encode_uncached
    enc = tiny_pipeline.text_encoder
    enc._cache.clear()
    monkeypatch.setattr(enc, "_encode_uncached", lambda prompts: seen.extend(prompts) or real(enc, prompts))
    erase(tiny_pipeline, PAIRS, EraseConfig(steps=3, lr=1e-3, pairs_per_step=2, aux_samples=2),
          preserve_prompts=["a green heart", "a blue star"], scales=TINY_SCALES)
    assert seen and len(seen) == len(set(seen)), seen
    assert {p.unsafe for p in PAIRS} | {p.safe for p in PAIRS} <= set(seen)


def test_drawing_the_targets_reports_progress_and_can_be_cancelled(tiny_pipeline):
    """The targets come before the first step (minutes on a real model): progress after every scale of every
    batch of images, and a raise there stops the run before any training."""
    seen = []
    erase(tiny_pipeline, PAIRS, EraseConfig(steps=1, lr=1e-3, preservation_weight=0),
          targets_callback=lambda done, total: seen.append((done, total)))
    total = len({p.safe for p in PAIRS})
    assert seen[-1] == (total, total) and len(seen) >= len(TINY_SCALES) + 1
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    def cancel(done, total):
        raise svare_core.Cancelled("stop")

    steps = []
    with pytest.raises(svare_core.Cancelled):
        erase(tiny_pipeline, PAIRS, EraseConfig(steps=5, lr=1e-3), callback=steps.append, targets_callback=cancel)
    assert steps == []


def test_auxiliary_seeds_are_per_prompt(tiny_pipeline, monkeypatch):
    """Each safe prompt draws its training targets with seeds of its own (shared seeds gave every
    safe prompt the same noise, so the same open attributes); 'shared' keeps the old behaviour."""
    a, b = prompt_seeds("a blue shape", 0, 3), prompt_seeds("a blue circle", 0, 3)
    assert a == prompt_seeds("a blue shape", 0, 3) and len(set(a)) == 3 and not set(a) & set(b)
    assert prompt_seeds("a blue shape", 5, 1)[0] == a[0] + 5
    drawn = []
    original = tokens_module.generate

    def spy(pipe, prompts, *, seeds, **kw):                # images are drawn in batches, each with its seed
        drawn.extend(zip(prompts, seeds))
        return original(pipe, prompts, seeds=seeds, **kw)

    monkeypatch.setattr(tokens_module, "generate", spy)
    run(tiny_pipeline, steps=1, aux_samples=2, preservation_weight=0)
    assert drawn == [(p.safe, s) for p in PAIRS for s in prompt_seeds(p.safe, 0, 2)]
    drawn.clear()
    run(tiny_pipeline, steps=1, aux_samples=2, preservation_weight=0, aux_seeds="shared")
    assert drawn == [(p.safe, s) for p in PAIRS for s in (0, 1)]
    with pytest.raises(ValueError, match="aux_seeds"):
        run(tiny_pipeline, aux_seeds="random")


def test_robust_erasure_trains_on_adversarial_conditions(tiny_pipeline, monkeypatch):
    from svare_core.erasure import robust

    refreshes = []
    original = robust.AdversarialPool._refresh

    def counted(self, run_, pairs):
        refreshes.append([p.unsafe for p in pairs])
        original(self, run_, pairs)

    monkeypatch.setattr(robust.AdversarialPool, "_refresh", counted)
    res = run(tiny_pipeline, steps=3, robust=True, adversarial_every=2, adversarial_steps=2)
    assert len(refreshes) == 2                              # steps 1 and 3
    assert all(h["adversarial_pairs"] == 2 for h in res.history)   # both pairs name "red": both attacked
    assert res.patch.meta["hyperparameters"]["robust"] is True
    plain = run(tiny_pipeline, steps=3).patch
    assert not all(torch.equal(plain.tensors[k], res.patch.tensors[k]) for k in plain.tensors)
    with pytest.raises(ValueError, match="S-VARE option"):
        run(tiny_pipeline, method="vare", robust=True)
    with pytest.raises(ValueError, match="names its concept"):
        erase(tiny_pipeline, [type(PAIRS[0])("a red shape", "a blue shape")],      # untagged: no concept word
              with_options(EraseConfig(), steps=1, robust=True))


def test_robust_erasure_on_a_vq_model():
    """The adversarial pool on the VQ toy model (a Switti): its soft-prompt features reach the model with
    the pooled vector recomputed from them, and the attack is guided by the sampler's ramp."""
    from svare_core import load_pipeline
    from svare_core.settings import resolve_erase

    vq = load_pipeline("toyworld_vq")
    cfg = resolve_erase(vq, PAIRS, steps=2, aux_samples=1, robust=True, adversarial_every=1, adversarial_steps=1)
    res = erase(vq, PAIRS, cfg)
    assert [h["adversarial_pairs"] for h in res.history] == [float(cfg.pairs_per_step)] * 2   # all name "red"
    assert all(math.isfinite(h["erase"]) for h in res.history) and res.patch.tensors


def test_robust_erasure_with_lora_the_real_families_default(tiny_pipeline):
    """Infinity and Switti erase with LoRA and have no robust recipe: the attacks run on the adapted student,
    and the patch holds LoRA factors only, different from a plain LoRA erasure's."""
    robust = run(tiny_pipeline, steps=2, robust=True, trainable="lora", adversarial_every=1, adversarial_steps=1).patch
    plain = run(tiny_pipeline, steps=2, trainable="lora").patch
    assert robust.meta["hyperparameters"]["trainable"] == "lora" and robust.meta["hyperparameters"]["robust"]
    assert set(robust.tensors) == set(plain.tensors) and all("lora" in k for k in robust.tensors)
    assert not all(torch.equal(plain.tensors[k], robust.tensors[k]) for k in plain.tensors)
