"""Erasure patches: files (round trip, refusals, atomic writes), exact apply / stack / remove, sharing with the
base, fingerprint checks, LoRA deltas, and merging into a standalone checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from svare_core import load_pipeline
from svare_core.erasure import ErasurePatch, PatchError, apply_patch, merge_to_checkpoint, remove_patch
from svare_core.erasure.patches import PATCH_VERSION
from svare_core.models import format as fmt
from svare_core.models.format import atomic_save_safetensors, save_model
from svare_core.models.infinity import Infinity
from svare_core.models import load_transformer

from conftest import TINY_SCALES, randomise, tiny_transformer_config

KEYS = ["block_chunks.0.module.0.ca.proj.weight", "block_chunks.1.module.0.ffn.fc1.bias",
        "block_chunks.0.module.0.ffn.fc2.weight"]


def random_patch(pipe, keys=KEYS, seed=0, concept="red", scale=0.01) -> ErasurePatch:
    g = torch.Generator().manual_seed(seed)
    state = pipe.transformer.state_dict()
    tensors = {k: torch.randn(state[k].shape, generator=g) * scale for k in keys}
    meta = {"base_fingerprint": pipe.base_fingerprint, "concepts": [concept], "method": "svare",
            "metrics": {"erasure_rate": 0.97}, "hyperparameters": {"lr": 2.3e-5, "betas": [0.9, 0.97]}}
    return ErasurePatch(tensors, meta)


def params(pipe) -> dict[str, torch.Tensor]:
    return dict(pipe.transformer.state_dict())


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- files --------------------------------------------------------------------------------------------
def test_save_load_round_trip(tiny_pipeline, tmp_path):
    patch = random_patch(tiny_pipeline)
    patch.tensors["block_chunks.0.module.0.ca.mat_q.weight.lora_A"] = torch.randn(2, 64)
    patch.tensors["block_chunks.0.module.0.ca.mat_q.weight.lora_B"] = torch.randn(64, 2)
    patch.meta["concepts"] = ["red", "Van Gogh"]
    path = patch.save(tmp_path / "sub" / "erase_red.safetensors")
    assert path == tmp_path / "sub" / "erase_red.safetensors" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left behind"
    back = ErasurePatch.load(path)
    assert back.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(back.tensors[k], patch.tensors[k]) for k in patch.tensors)
    assert back.meta == patch.meta
    assert back.concepts == ["red", "Van Gogh"] and back.base_fingerprint == tiny_pipeline.base_fingerprint
    assert back.num_values() == sum(t.numel() for t in patch.tensors.values())
    header = fmt.read_metadata(path)
    assert header["format"] == "svare-erasure-patch" and header["format_version"] == str(PATCH_VERSION)


def test_load_refuses_a_model_file(tiny_pipeline, tmp_path):
    model_file = save_model(tmp_path / "model.safetensors", transformer=tiny_pipeline.transformer)
    with pytest.raises(PatchError, match=r"model\.safetensors: is not an erasure patch .*load_pipeline"):
        ErasurePatch.load(model_file)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))           # no metadata at all
    with pytest.raises(PatchError, match="plain.safetensors: is not an erasure patch"):
        ErasurePatch.load(plain)


def test_load_refuses_corrupt_truncated_and_missing_files(tiny_pipeline, tmp_path):
    good = random_patch(tiny_pipeline).save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    for bad in (truncated, garbage):
        with pytest.raises(PatchError, match=f"{bad.name}: cannot be read .*corrupt or truncated"):
            ErasurePatch.load(bad)
    with pytest.raises(PatchError, match="missing.safetensors: no such patch file"):
        ErasurePatch.load(tmp_path / "missing.safetensors")
    with pytest.raises(PatchError, match="no such patch file"):
        ErasurePatch.load(tmp_path)                          # a folder


def test_load_refuses_a_newer_format(tiny_pipeline, tmp_path):
    path = tmp_path / "future.safetensors"
    atomic_save_safetensors({"a": torch.zeros(1)}, path, {"format": "svare-erasure-patch",
                                                         "format_version": str(PATCH_VERSION + 1),
                                                         "svare_patch": json.dumps({"concepts": ["red"]})})
    with pytest.raises(PatchError, match=rf"future.safetensors: patch format {PATCH_VERSION + 1} is newer .*update svare"):
        ErasurePatch.load(path)


def test_atomic_write_leaves_nothing_when_interrupted(tiny_pipeline, tmp_path, monkeypatch):
    target = tmp_path / "out" / "erase.safetensors"
    real_save = fmt.save_file

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:                     # a partial file, then Ctrl-C
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "save_file", interrupted)
    patch = random_patch(tiny_pipeline)
    with pytest.raises(KeyboardInterrupt):
        patch.save(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == [], "a temporary file was left behind"
    # an existing file is kept intact by an interrupted overwrite
    monkeypatch.setattr(fmt, "save_file", real_save)
    patch.save(target)
    before = target.read_bytes()
    monkeypatch.setattr(fmt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        random_patch(tiny_pipeline, seed=1).save(target)
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == [target.name]
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "model.safetensors", transformer=tiny_pipeline.transformer)
    assert not (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))


# -- applying, stacking, removing ---------------------------------------------------------------------
def test_strength_zero_gives_the_base_weights_exactly(tiny_pipeline):
    base = params(tiny_pipeline)
    assert_state_equal(params(apply_patch(tiny_pipeline, random_patch(tiny_pipeline), 0.0)), base)


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0, 2.5])
def test_strength_scales_the_delta(tiny_pipeline, strength):
    base, patch = params(tiny_pipeline), random_patch(tiny_pipeline)
    patched = apply_patch(tiny_pipeline, patch, strength)
    got = params(patched)
    for k in base:
        expected = base[k] + strength * patch.tensors[k] if k in patch.tensors else base[k]
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6)
        if k in patch.tensors and strength:
            assert not torch.equal(got[k], base[k])
    assert patched.patches == [(patch, strength)]
    assert patched.base_fingerprint == tiny_pipeline.base_fingerprint
    assert patched.fingerprint() != tiny_pipeline.fingerprint()


def test_stacking_sums_and_removing_is_exact(tiny_pipeline):
    base = params(tiny_pipeline)
    p1 = random_patch(tiny_pipeline, seed=1, concept="red")
    p2 = random_patch(tiny_pipeline, keys=KEYS[:2] + ["block_chunks.1.module.0.ca.mat_kv.weight"], seed=2, concept="star")
    stacked = apply_patch(apply_patch(tiny_pipeline, p1, 0.7), p2, 1.3)
    got = params(stacked)
    for k in base:
        expected = base[k] + 0.7 * p1.tensors.get(k, torch.zeros_like(base[k])) + 1.3 * p2.tensors.get(k, torch.zeros_like(base[k]))
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6)
    assert [s for _, s in stacked.patches] == [0.7, 1.3]
    # patches stack on the base, not on each other: applying to the patched pipeline still starts from the base
    assert stacked.base_transformer is tiny_pipeline.transformer

    only_second = remove_patch(stacked, 0)
    assert_state_equal(params(only_second), params(apply_patch(tiny_pipeline, p2, 1.3)))
    assert only_second.patches == [(p2, 1.3)]
    assert_state_equal(params(remove_patch(stacked, -1)), params(apply_patch(tiny_pipeline, p1, 0.7)))
    back = remove_patch(remove_patch(stacked, 1), 0)
    assert back.patches == []
    assert_state_equal(params(back), base)
    assert back.fingerprint() == tiny_pipeline.fingerprint()
    with pytest.raises(PatchError, match="no applied patch number 2: 2 are applied"):
        remove_patch(stacked, 2)
    with pytest.raises(PatchError, match="0 are applied"):
        remove_patch(tiny_pipeline, 0)


def test_apply_never_modifies_the_input_pipeline(tiny_pipeline):
    base = {k: v.clone() for k, v in params(tiny_pipeline).items()}
    transformer = tiny_pipeline.transformer
    p = random_patch(tiny_pipeline)
    stacked = apply_patch(apply_patch(tiny_pipeline, p), random_patch(tiny_pipeline, seed=3))
    remove_patch(stacked, 0)
    assert tiny_pipeline.transformer is transformer and tiny_pipeline.patches == []
    assert_state_equal(params(tiny_pipeline), base)
    assert p.tensors.keys() == set(KEYS)


def test_untouched_tensors_are_shared_with_the_base(tiny_pipeline):
    # Memory: a patched multi-GB model costs only the tensors its patches touch.
    base = params(tiny_pipeline)
    patched = params(apply_patch(tiny_pipeline, random_patch(tiny_pipeline)))
    for k in base:
        if k in KEYS:
            assert patched[k].data_ptr() != base[k].data_ptr()
        else:
            assert patched[k].data_ptr() == base[k].data_ptr(), f"{k} was copied"
    patched_model = apply_patch(tiny_pipeline, random_patch(tiny_pipeline)).transformer
    assert not patched_model.training and not any(p.requires_grad for p in patched_model.parameters())


def test_patch_for_another_base_is_refused_unless_forced(tiny_pipeline):
    patch = random_patch(tiny_pipeline)
    patch.meta["base_fingerprint"] = "0123456789abcdef"
    with pytest.raises(PatchError, match=rf"base model 0123456789abcdef, not for this one \({tiny_pipeline.base_fingerprint}\)"):
        apply_patch(tiny_pipeline, patch)
    forced = apply_patch(tiny_pipeline, patch, force=True)
    torch.testing.assert_close(params(forced)[KEYS[0]], params(tiny_pipeline)[KEYS[0]] + patch.tensors[KEYS[0]])
    # the check is against the base, so it also holds on an already patched pipeline
    patched = apply_patch(tiny_pipeline, random_patch(tiny_pipeline))
    apply_patch(patched, random_patch(tiny_pipeline, seed=4))
    with pytest.raises(PatchError, match="made for the base model"):
        apply_patch(patched, patch)
    # a patch without a recorded base fits nothing known: refused unless forced
    del patch.meta["base_fingerprint"]
    with pytest.raises(PatchError, match="records no base model fingerprint"):
        apply_patch(tiny_pipeline, patch)
    apply_patch(tiny_pipeline, patch, force=True)


def test_patch_that_does_not_fit_the_model(tiny_pipeline):
    missing = random_patch(tiny_pipeline)
    missing.tensors["block_chunks.9.module.0.ca.proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(PatchError, match=r"changes 'block_chunks\.9\.module\.0\.ca\.proj\.weight', which this model does not have"):
        apply_patch(tiny_pipeline, missing)
    wrong = random_patch(tiny_pipeline)
    wrong.tensors[KEYS[0]] = torch.zeros(32, 64)
    with pytest.raises(PatchError, match=r"shape \(32, 64\), the model \(64, 64\)"):
        apply_patch(tiny_pipeline, wrong)


def test_lora_patch_deltas(tiny_pipeline):
    name = "block_chunks.0.module.0.ca.mat_kv.weight"
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 64, generator=g), torch.randn(128, 3, generator=g) * 0.01
    patch = ErasurePatch({name + ".lora_A": A, name + ".lora_B": B, KEYS[1]: torch.ones(128)},
                         {"lora_scale": 0.5, "base_fingerprint": tiny_pipeline.base_fingerprint})
    deltas = patch.deltas()
    assert set(deltas) == {name, KEYS[1]}
    torch.testing.assert_close(deltas[name], 0.5 * B @ A)
    base = params(tiny_pipeline)
    got = params(apply_patch(tiny_pipeline, patch, 2.0))
    torch.testing.assert_close(got[name], base[name] + 2.0 * 0.5 * B @ A, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[KEYS[1]], base[KEYS[1]] + 2.0, rtol=0, atol=1e-6)
    assert ErasurePatch({name + ".lora_A": A, name + ".lora_B": B}).deltas()[name].equal(B @ A)   # default scale 1


def test_merge_to_checkpoint_loads_as_the_patched_model(tiny_pipeline, tmp_path):
    tiny_pipeline.text_encoder_name = "minilm"
    patched = apply_patch(apply_patch(tiny_pipeline, random_patch(tiny_pipeline), 0.8),
                          random_patch(tiny_pipeline, seed=5, concept="star"))
    path = merge_to_checkpoint(patched, tmp_path / "merged.safetensors")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    meta = fmt.read_metadata(path)
    assert json.loads(meta["erased_concepts"]) == ["red", "star"]
    assert meta["base_fingerprint"] == tiny_pipeline.base_fingerprint and meta["name"] == "tiny-erased"
    expected = params(patched)
    assert_state_equal(load_transformer(path).state_dict(), expected)
    loaded = load_pipeline(path)
    assert_state_equal(params(loaded), expected)
    assert loaded.scales == list(TINY_SCALES) and loaded.text_encoder_name == "minilm"
    for k, v in tiny_pipeline.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[k], v), k
    # the merged model is a new base: patches for the old base are refused on it
    with pytest.raises(PatchError, match="made for the base model"):
        apply_patch(loaded, random_patch(tiny_pipeline))
    assert loaded.base_fingerprint == fmt.state_dict_fingerprint(patched.transformer.state_dict())


def test_apply_on_a_bf16_model_keeps_its_dtype(tiny_pipeline):
    bf16 = tiny_pipeline.with_transformer(randomise(Infinity(tiny_transformer_config())).to(torch.bfloat16).eval())
    bf16.base_fingerprint = bf16.fingerprint()
    bf16.base_transformer = None
    patch = random_patch(bf16)
    patched = params(apply_patch(bf16, patch))
    base = params(bf16)
    assert all(v.dtype == torch.bfloat16 for v in patched.values())
    torch.testing.assert_close(patched[KEYS[0]].float(), (base[KEYS[0]].float() + patch.tensors[KEYS[0]]).bfloat16().float())
    assert_state_equal(params(remove_patch(apply_patch(bf16, patch), 0)), base)
