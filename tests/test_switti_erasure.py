"""Erasure on Switti (4096-way VQ tokens; here the tiny model of tests/fixtures/switti_tiny with the
tiny CLIP towers, loaded through load_pipeline): the token-level filter (a code is wrong when it is
not among the student's top-k codes) selects exactly the tokens it should; auxiliary tokens are hard
indices whose inputs are what the model drew from; S-VARE with LoRA and with a dense set, naive
VARE and ESD train and lower their objective; patches round-trip, apply, refuse another base and
come off exactly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from svare_core.erasure import ErasurePatch, PatchError, PromptPair, apply_patch, erase, remove_patch
from svare_core.erasure import losses
from svare_core.erasure.run import ErasureRun
from svare_core.erasure.tokens import aux_settings, auxiliary_tokens
from svare_core.erasure.trainable import add_lora, dense_parameters, lora_layers, remove_lora
from svare_core.models.switti import Switti
from svare_core.pipeline import VARPipeline
from svare_core.sampling_vq import VQSamplerSettings
from svare_core.settings import resolve_erase
from tests.test_switti_parity import goldens, ref_config  # noqa: F401
from tests.test_switti_pipeline import pipeline_files, switti_pipe  # noqa: F401

PAIRS = [PromptPair("a red cube", "a blue cube", concept="red")]


def config(pipe, **kw):
    base = dict(steps=6, lr=3e-3, pairs_per_step=1, teacher_cfg=3.0, precision="fp32", gradient_checkpointing=False,
                trainable="lora", lora_rank=2, seed=0)
    return resolve_erase(pipe, PAIRS, **{**base, **kw})


# -- the filter, on hand-made logits ------------------------------------------------------------------
def test_code_filter_selects_exactly_the_tokens_whose_code_is_not_in_the_top_k():
    # 5 tokens over 6 codes; the label is code 0; its rank (codes with a strictly higher logit): 0, 1, 2, 5, 0
    logits = torch.tensor([[[5.0, 1, 1, 1, 1, 1],       # rank 0: the argmax
                            [2.0, 3, 1, 1, 1, 1],       # rank 1
                            [2.0, 3, 4, 1, 1, 1],       # rank 2
                            [0.0, 1, 2, 3, 4, 5],       # rank 5: the least likely
                            [3.0, 3, 3, 3, 3, 3]]])     # tied with all: rank 0 (ties count as in)
    labels = torch.zeros(1, 5, dtype=torch.long)
    assert losses.code_keep_mask(logits, labels).tolist() == [[0, 1, 1, 1, 0]]                 # top-1
    assert losses.code_keep_mask(logits, labels, code_top_k=2).tolist() == [[0, 0, 1, 1, 0]]
    assert losses.code_keep_mask(logits, labels, code_top_k=3).tolist() == [[0, 0, 0, 1, 0]]
    assert losses.code_keep_mask(logits, labels, code_top_k=6).tolist() == [[0, 0, 0, 0, 0]]
    # one V-way symbol a token: any error rate in (0, 1] is the same rule; 0 keeps every token
    assert losses.code_keep_mask(logits, labels, token_error_rate=1.0).tolist() == [[0, 1, 1, 1, 0]]
    assert losses.code_keep_mask(logits, labels, token_error_rate=0.0).tolist() == [[1, 1, 1, 1, 1]]


def test_filtered_ce_on_codes_is_the_kept_tokens_ce_over_all_tokens():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 7, 16, generator=g), torch.randint(16, (2, 7), generator=g)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")           # (2, 7)
    torch.testing.assert_close(losses.symbol_losses(logits, labels)[..., 0], ce)
    wrong = (logits > logits.gather(-1, labels[..., None])).sum(-1) >= 1
    loss, kept = losses.filtered_ce(logits, labels)
    torch.testing.assert_close(loss, (ce * wrong).sum(-1).div(7).mean())
    assert kept == pytest.approx(wrong.float().mean().item()) and 0 < kept < 1
    torch.testing.assert_close(losses.plain_ce(logits, labels), ce.mean())
    # a scale mask restricts both the filter's share and the normalisation to the supervised tokens
    mask = torch.tensor([1.0, 0, 0, 1, 1, 0, 0])
    loss_m, kept_m = losses.filtered_ce(logits, labels, token_mask=mask)
    torch.testing.assert_close(loss_m, (ce * wrong * mask).sum(-1).div(3).mean())
    assert kept_m == pytest.approx((wrong * mask).sum().item() / 6)


def test_kl_and_esd_on_codes():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    expected = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(losses.preservation_kl(s, t), expected)
    assert losses.preservation_kl(t, t).item() == pytest.approx(0, abs=1e-7)
    mask = torch.tensor([1.0, 1, 0, 0, 0])
    torch.testing.assert_close(losses.esd_loss(s, t, mask), ((s - t) ** 2).mean(-1)[:, :2].mean())


def test_per_token_guidance_weights():
    cond, uncond = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), 1.0)
    w = torch.tensor([1.0, 2.0, 4.0])
    out = losses.guided_logits(cond, uncond, w)
    assert out[0, :, 0].tolist() == [2.0, 3.0, 5.0]          # w * 2 + (1 - w) * 1


# -- on the tiny Switti ---------------------------------------------------------------------------------
def test_guidance_is_switti_s_ramp(switti_pipe):  # noqa: F811
    scales = switti_pipe.transformer.cfg.scales                                   # 1, 2, 3, 4: 30 tokens
    run = ErasureRun(switti_pipe, switti_pipe.transformer, switti_pipe.transformer, config(switti_pipe), PAIRS, [],
                     scales, torch.Generator(), sampler=VQSamplerSettings(cfg_start=1, cfg_stop=3))
    w = run.guidance(6.0)
    per_scale = [float(x[0]) for x in torch.split(w, [h * h for h, _ in scales])]
    assert w.shape == (30,) and per_scale == [1.0, 1 + 6 * 1 / 3, 1 + 6 * 2 / 3, 1.0]   # on from 1, off from 3


def test_lora_and_dense_sets_use_switti_s_names(switti_pipe):  # noqa: F811
    model = switti_pipe.clone_transformer()
    attn = sorted(lora_layers(model, "attn"))
    assert attn == sorted(f"blocks.{i}.{n}" for i in range(2) for n in
                          ("attn.to_qkv", "attn.proj", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.proj"))
    assert sorted(lora_layers(model, "xattn_out")) == ["blocks.0.cross_attn.proj", "blocks.1.cross_attn.proj"]
    assert len(lora_layers(model, "attn_ffn")) == 2 * 8
    dense = dense_parameters(model, "xattn_ffn")
    assert dense and all(".cross_attn." in n or ".ffn." in n for n in dense)
    assert {n.split(".")[2] for n in dense} == {"cross_attn", "ffn"}
    assert set(dense_parameters(model, "xattn_kv")) == {f"blocks.{i}.cross_attn.to_kv.{p}" for i in range(2)
                                                         for p in ("weight", "bias")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, "attn", 2)
    remove_lora(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auxiliary_tokens_are_hard_indices_with_their_own_inputs(switti_pipe, tmp_path):  # noqa: F811
    pipe = switti_pipe
    cfg = config(pipe)
    s = aux_settings(pipe, cfg)
    assert isinstance(s, VQSamplerSettings) and s.smooth is False and s.cfg == 3.0 and s.top_k == 400
    scales = pipe.transformer.cfg.scales
    aux = auxiliary_tokens(pipe, ["a blue cube"], seeds=[0, 1], settings=s, scales=scales, cache_dir=tmp_path)
    a = aux["a blue cube"]
    assert a.labels.dtype == torch.long and a.labels.shape == (2, 30) and int(a.labels.max()) < 64
    x, _ = pipe.vae.teacher_forcing_inputs(list(torch.split(a.labels, [h * w for h, w in scales], dim=1)), scales)
    torch.testing.assert_close(a.inputs, x, rtol=0, atol=0)
    # what the sampler drew with this seed, and the same from the cache
    from svare_core.sampling import generate
    drawn = torch.cat(generate(pipe, ["a blue cube"], seed=1, settings=s, decode=False).indices, dim=1)
    assert torch.equal(a.labels[1:], drawn)
    again = auxiliary_tokens(pipe, ["a blue cube"], seeds=[0, 1], settings=s, scales=scales, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 and torch.equal(again["a blue cube"].labels, a.labels)


def _erase_ce(pipe, transformer, cfg) -> float:
    """The plain CE of ``transformer`` on the auxiliary tokens of the safe prompt, under the unsafe prompt."""
    scales = pipe.transformer.cfg.scales
    aux = auxiliary_tokens(pipe, [PAIRS[0].safe], seeds=[cfg.seed], settings=aux_settings(pipe, cfg), scales=scales)
    a = aux[PAIRS[0].safe]
    with torch.no_grad():
        logits = transformer(transformer.encode_text(*pipe.encode_prompts([PAIRS[0].unsafe])), a.inputs, scales)
    return losses.plain_ce(logits, a.labels).item()


@pytest.mark.parametrize("trainable", ["lora", "xattn_ffn"])
def test_svare_steps_lower_the_loss_and_the_patch_round_trips(switti_pipe, tmp_path, trainable):  # noqa: F811
    pipe = switti_pipe
    cfg = config(pipe, trainable=trainable, steps=8, lr=3e-3 if trainable == "lora" else 1e-3)
    result = erase(pipe, PAIRS, cfg, preserve_prompts=["a green tree"])
    h = result.history
    assert len(h) == 8 and all(math.isfinite(r["erase"]) and math.isfinite(r["preserve"]) for r in h)
    assert all(0 <= r["kept_tokens"] <= 1 for r in h)
    patch = result.patch
    names = patch.delta_names()
    if trainable == "lora":
        assert all(n.endswith(".weight") and n.split(".")[2] in ("attn", "cross_attn") for n in names)
        assert any(k.endswith(".lora_A") for k in patch.tensors)
    else:
        assert set(names) == set(dense_parameters(pipe.transformer, "xattn_ffn"))
    assert patch.base_fingerprint == pipe.base_fingerprint and patch.meta["method"] == "svare"

    # the erasure objective's CE fell on the training tokens
    erased = apply_patch(pipe, ErasurePatch.load(patch.save(tmp_path / "p.safetensors")))
    before, after = _erase_ce(pipe, pipe.transformer, cfg), _erase_ce(pipe, erased.transformer, cfg)
    assert after < before - 0.05, (before, after)
    assert type(erased.transformer) is type(pipe.transformer)

    # exact: apply = base + delta; removal gives the base weights back bit for bit
    base, new = pipe.transformer.state_dict(), erased.transformer.state_dict()
    for n in names:
        torch.testing.assert_close(new[n], base[n] + patch.delta(n), rtol=0, atol=1e-6)
    assert all(torch.equal(new[k], base[k]) for k in base if k not in names)
    back = remove_patch(erased, 0).transformer.state_dict()
    assert all(torch.equal(back[k], base[k]) for k in base)
    assert pipe.transformer.state_dict().keys() == base.keys()


def test_patch_for_another_switti_is_refused(switti_pipe):  # noqa: F811
    pipe = switti_pipe
    patch = erase(pipe, PAIRS, config(pipe, steps=1, preservation_weight=0.0)).patch
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    state["head.bias"] += 0.01                                # another model of the same shape
    other = Switti(pipe.transformer.cfg)
    other.load_state_dict(state)
    other_pipe = VARPipeline(other, pipe.vae, pipe.text_encoder, name="other", family="switti")
    with pytest.raises(PatchError, match="was made for the base model"):
        apply_patch(other_pipe, patch)
    assert apply_patch(other_pipe, patch, force=True).transformer is not other


@pytest.mark.parametrize("method", ["vare", "esd"])
def test_baselines_train_on_switti(switti_pipe, method):  # noqa: F811
    pipe = switti_pipe
    result = erase(pipe, PAIRS, config(pipe, method=method, steps=4, trainable="xattn", lr=1e-3))
    key = "esd" if method == "esd" else "erase"
    assert len(result.history) == 4 and all(math.isfinite(r[key]) for r in result.history)
    assert result.patch.meta["method"] == method and result.patch.num_values() > 0
    assert all(".cross_attn." in n for n in result.patch.delta_names())
