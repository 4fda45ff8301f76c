"""Loading real files from disk: every layout the released models come in, the project's own format,
and every way a file can be wrong (each error is a ModelLoadError that names the file)."""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svare_core.loader import load_pipeline
from svare_core.models.format import read_metadata, save_model
from svare_core.models.infinity import Infinity
from svare_core.models import ModelLoadError, inspect_file, load_transformer, load_vae
from svare_core.models.vae import BSQVAE
from svare_core.pipeline import VARPipeline

from conftest import TINY_SCALES, randomise, tiny_transformer_config, tiny_vae_config


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformer() -> Infinity:
    # rope_grid (64, 64) is what a raw checkpoint (no config inside) gets, so raw files load to the same model.
    torch.manual_seed(0)
    return randomise(Infinity(tiny_transformer_config(rope_grid=(64, 64))), seed=3).eval()


@pytest.fixture(scope="module")
def vae() -> BSQVAE:
    # GroupNorm's group count is not stored in a raw VAE file; the released rule (32, else 24) applies,
    # so widths 24/48 (24 groups) load back to the same model.
    torch.manual_seed(0)
    return randomise(BSQVAE(tiny_vae_config(ch=24, norm_groups=32)), seed=4).eval()


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@torch.no_grad()
def transformer_out(model: Infinity) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(2, 5, model.cfg.text_dim, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    L = sum(h * w for h, w in TINY_SCALES)
    x = torch.randn(2, L - 1, model.cfg.bits, generator=g)
    return model(model.encode_text(feats, mask), x, TINY_SCALES)


@torch.no_grad()
def vae_out(model: BSQVAE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    img = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    z = model.encode_latent(img)
    return z, model.decode(z)


def assert_same_vae(a: BSQVAE, b: BSQVAE) -> None:
    za, ia = vae_out(a)
    zb, ib = vae_out(b)
    torch.testing.assert_close(za, zb, rtol=0, atol=0)
    torch.testing.assert_close(ia, ib, rtol=0, atol=0)


def unwrap_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wrapped layer names (conv1.conv.weight, norm1.norm.weight) -> plain ones (conv1.weight, norm1.weight)."""
    return {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in state.items()}


def error_for(fn, *args, **kw) -> str:
    with pytest.raises(ModelLoadError) as e:
        fn(*args, **kw)
    return str(e.value)


# -- formats that load -----------------------------------------------------------------------------
def test_transformer_pth(tmp_path, transformer):
    path = tmp_path / "infinity.pth"
    torch.save(plain_state(transformer), path)
    loaded = load_transformer(path)
    assert loaded.cfg.to_dict() == {**transformer.cfg.to_dict(), "scales": []}
    torch.testing.assert_close(transformer_out(loaded), transformer_out(transformer), rtol=0, atol=0)


def test_transformer_safetensors(tmp_path, transformer):
    path = tmp_path / "infinity.safetensors"
    save_file(plain_state(transformer), str(path))
    torch.testing.assert_close(transformer_out(load_transformer(path)), transformer_out(transformer), rtol=0, atol=0)


def test_transformer_dtype_and_device(tmp_path, transformer):
    path = tmp_path / "infinity.pth"
    torch.save(plain_state(transformer), path)
    loaded = load_transformer(path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    assert not loaded.training


@pytest.mark.parametrize("wrapper", ["vae", "ema", None])
def test_vae_file_layouts(tmp_path, vae, wrapper):
    state = plain_state(vae)
    path = tmp_path / "vae.pth"
    torch.save({wrapper: state} if wrapper else state, path)
    loaded = load_vae(path, token_bits=8)
    assert loaded.cfg.ch_mult == vae.cfg.ch_mult and loaded.cfg.z_channels == 8
    assert_same_vae(loaded, vae)


def test_vae_plain_conv_and_norm_keys(tmp_path, vae):
    state = unwrap_keys(plain_state(vae))
    assert "encoder.conv_in.weight" in state and "encoder.down.0.block.0.norm1.weight" in state
    assert "encoder.down.0.downsample.conv.weight" in state
    assert not any(".conv.conv." in k or ".norm.weight" in k for k in state)
    path = tmp_path / "vae_plain.pth"
    torch.save({"vae": state}, path)
    assert_same_vae(load_vae(path), vae)


def test_vae_without_quantize_alias(tmp_path, vae):
    state = {k: v for k, v in plain_state(vae).items() if not k.startswith("quantize.")}
    path = tmp_path / "vae.pth"
    torch.save({"vae": state}, path)
    assert_same_vae(load_vae(path), vae)


def test_vae_patchify_from_token_bits(tmp_path):
    # A 14-channel latent serves 56-bit tokens as 2x2 patches (Infinity-8B's VAE).
    vae14 = randomise(BSQVAE(tiny_vae_config(z_channels=14, ch=12, norm_groups=4)), seed=5).eval()
    path = tmp_path / "vae14.pth"
    torch.save({"vae": plain_state(vae14)}, path)
    loaded = load_vae(path, token_bits=56)
    assert loaded.cfg.patch_size == 2 and loaded.cfg.bits == 56
    assert load_vae(path).cfg.patch_size == 1


def test_sharded_safetensors(tmp_path, transformer):
    state = plain_state(transformer)
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    torch.testing.assert_close(transformer_out(load_transformer(index)), transformer_out(transformer), rtol=0, atol=0)
    # a missing shard is named
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    msg = error_for(load_transformer, index)
    assert str(index) in msg and "model-00002-of-00002.safetensors" in msg


def test_svare_format_round_trip(tmp_path, transformer, vae):
    path = tmp_path / "model.safetensors"
    save_model(path, transformer=transformer, vae=vae, text_encoder="minilm", scales=TINY_SCALES)
    meta = read_metadata(path)
    assert meta["format"] == "svare-var" and meta["text_encoder"] == "minilm"
    assert json.loads(meta["transformer_config"]) == json.loads(json.dumps(transformer.cfg.to_dict()))
    assert json.loads(meta["vae_config"]) == json.loads(json.dumps(vae.cfg.to_dict()))
    assert json.loads(meta["scales"]) == [list(s) for s in TINY_SCALES]
    t2, v2 = load_transformer(path), load_vae(path, token_bits=8)
    assert t2.cfg == transformer.cfg and v2.cfg == vae.cfg
    torch.testing.assert_close(transformer_out(t2), transformer_out(transformer), rtol=0, atol=0)
    assert_same_vae(v2, vae)
    info = inspect_file(path)
    assert info.family == "svare" and info.supported
    assert sorted(info.components) == ["transformer", "vae"]
    assert info.config["transformer_config"]["depth"] == transformer.cfg.depth


def test_svare_file_without_component(tmp_path, transformer, vae):
    t_only, v_only = tmp_path / "t.safetensors", tmp_path / "v.safetensors"
    save_model(t_only, transformer=transformer)
    save_model(v_only, vae=vae)
    msg = error_for(load_vae, t_only)
    assert str(t_only) in msg and "no VAE" in msg
    msg = error_for(load_transformer, v_only)
    assert str(v_only) in msg and "no transformer" in msg


def test_reference_pth_converts_to_safetensors(tmp_path):
    """The reference tiny checkpoint (.pth) saved as .safetensors loads to the same model."""
    ref = Path(__file__).parent / "fixtures" / "reference_tiny" / "infinity_tiny.pth"
    state = torch.load(ref, map_location="cpu", weights_only=True)
    st = tmp_path / "infinity_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    a, b = load_transformer(ref), load_transformer(st)
    assert a.cfg == b.cfg
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb), ka
    assert inspect_file(st).config == inspect_file(ref).config


# -- inspect ---------------------------------------------------------------------------------------------
def test_inspect_transformer_and_vae(tmp_path, transformer, vae):
    tp, vp = tmp_path / "inf.pth", tmp_path / "vae.pth"
    torch.save(plain_state(transformer), tp)
    torch.save({"vae": plain_state(vae)}, vp)
    info = inspect_file(tp)
    assert info.family == "infinity" and info.supported and info.components == ["transformer"]
    n_float = sum(v.numel() for v in transformer.state_dict().values() if v.is_floating_point())
    assert info.num_params == n_float
    assert info.config["depth"] == 2 and info.config["embed_dim"] == 64 and info.config["bits"] == 8
    s = info.summary()
    assert str(tp) in s and "infinity" in s and f"{n_float:,}" in s and "supported: yes" in s
    assert "embed_dim: 64" in s and "depth: 2" in s
    vinfo = inspect_file(vp)
    assert vinfo.family == "infinity-vae" and vinfo.components == ["vae"] and vinfo.config["z_channels"] == 8
    assert vinfo.num_params == sum(v.numel() for k, v in vae.state_dict().items() if not k.startswith("quantize"))


# -- errors: every message names the file ---------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    p = tmp_path / "nope.safetensors"
    for fn in (load_transformer, load_vae, inspect_file):
        msg = error_for(fn, p)
        assert str(p) in msg and "no such file" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, transformer, suffix):
    p = tmp_path / f"infinity{suffix}"
    if suffix == ".pth":
        torch.save(plain_state(transformer), p)
    else:
        save_file(plain_state(transformer), str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    msg = error_for(load_transformer, p)
    assert str(p) in msg and "corrupt" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".ckpt"])
def test_random_bytes(tmp_path, suffix):
    p = tmp_path / f"garbage{suffix}"
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    msg = error_for(load_transformer, p)
    assert str(p) in msg


def test_unknown_suffix(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\0" * 16)
    msg = error_for(load_transformer, p)
    assert str(p) in msg and ".onnx" in msg


def test_vae_given_as_transformer_and_back(tmp_path, transformer, vae):
    vp, tp = tmp_path / "vae.pth", tmp_path / "inf.pth"
    torch.save({"vae": plain_state(vae)}, vp)
    torch.save(plain_state(transformer), tp)
    msg = error_for(load_transformer, vp)
    assert str(vp) in msg and "not an Infinity transformer" in msg
    msg = error_for(load_vae, tp)
    assert str(tp) in msg and "not an Infinity BSQ VAE" in msg


def test_unknown_model(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}, str(p))
    msg = error_for(load_transformer, p)
    assert str(p) in msg and "foo.weight" in msg


def test_missing_key(tmp_path, transformer):
    state = plain_state(transformer)
    del state["block_chunks.1.module.0.ffn.fc2.bias"]
    p = tmp_path / "inf.pth"
    torch.save(state, p)
    msg = error_for(load_transformer, p)
    assert str(p) in msg and "missing keys" in msg and "block_chunks.1.module.0.ffn.fc2.bias" in msg


def test_unexpected_key(tmp_path, transformer):
    state = plain_state(transformer)
    state["block_chunks.0.module.0.extra.weight"] = torch.zeros(3)
    p = tmp_path / "inf.safetensors"
    save_file(state, str(p))
    msg = error_for(load_transformer, p)
    assert str(p) in msg and "unexpected keys" in msg and "extra.weight" in msg


def test_wrong_shape(tmp_path, transformer):
    state = plain_state(transformer)
    state["block_chunks.1.module.0.ffn.fc1.bias"] = torch.zeros(7)
    p = tmp_path / "inf.pth"
    torch.save(state, p)
    msg = error_for(load_transformer, p)
    assert str(p) in msg and "shape" in msg and "block_chunks.1.module.0.ffn.fc1.bias" in msg


def test_vae_too_narrow_for_transformer(tmp_path, vae):
    p = tmp_path / "vae.pth"
    torch.save({"vae": plain_state(vae)}, p)
    msg = error_for(load_vae, p, token_bits=16)
    assert str(p) in msg and "8-channel" in msg and "16-bit" in msg
    sv = tmp_path / "vae.safetensors"
    save_model(sv, vae=vae)
    msg = error_for(load_vae, sv, token_bits=32)
    assert str(sv) in msg and "32-bit" in msg


def test_no_tensors_in_file(tmp_path):
    p = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 1e-4}}, p)
    msg = error_for(load_transformer, p)
    assert str(p) in msg and "no state dict" in msg


class _Trap:
    """Unpickling this object would create a file: weights_only loading must refuse it, not run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_not_executed(tmp_path, transformer, writer):
    marker = tmp_path / "pwned.txt"
    p = tmp_path / "evil.pth"
    payload = {**plain_state(transformer), "trap": _Trap(str(marker))}
    if writer == "torch":
        torch.save(payload, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    for fn in (load_transformer, inspect_file):
        msg = error_for(fn, p)
        assert str(p) in msg
    assert not marker.exists(), "loading executed code from the pickle"
    # the payload really is live: an unsafe load would have created the file
    other = tmp_path / "control.txt"
    control = tmp_path / "control.pth"
    with open(control, "wb") as f:
        pickle.dump(_Trap(str(other)), f)
    with open(control, "rb") as f:
        pickle.load(f).close()
    assert other.exists()


# -- load_pipeline -------------------------------------------------------------------------------------------
def test_load_pipeline_svare_file(tmp_path, transformer, vae):
    path = tmp_path / "model.safetensors"
    save_model(path, transformer=transformer, vae=vae, text_encoder="minilm")
    pipe = load_pipeline(path, text_encoder="minilm")
    assert isinstance(pipe, VARPipeline) and pipe.name == "model"
    assert pipe.scales == list(TINY_SCALES)                 # from the transformer config
    torch.testing.assert_close(transformer_out(pipe.transformer), transformer_out(transformer), rtol=0, atol=0)
    assert_same_vae(pipe.vae, vae)
    assert pipe.text_encoder.width == 384
    # the text encoder named in the file is used when none is given
    pipe2 = load_pipeline(path)
    assert pipe2.text_encoder.width == 384


def test_load_pipeline_without_vae(tmp_path, transformer):
    path = tmp_path / "t.safetensors"
    save_model(path, transformer=transformer, text_encoder="minilm")
    msg = error_for(load_pipeline, path, text_encoder="minilm")
    assert str(path) in msg and "VAE" in msg
    pth = tmp_path / "t.pth"
    torch.save(plain_state(transformer), pth)
    msg = error_for(load_pipeline, pth, text_encoder="minilm")
    assert str(pth) in msg and "VAE" in msg


def test_load_pipeline_missing_file(tmp_path):
    p = tmp_path / "absent.safetensors"
    msg = error_for(load_pipeline, p)
    assert str(p) in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_pipeline_corrupt_file(tmp_path, suffix):
    p = tmp_path / f"broken{suffix}"
    p.write_bytes(b"not a model" * 50)
    msg = error_for(load_pipeline, p, text_encoder="minilm")
    assert str(p) in msg


def test_legacy_torch_save_format(tmp_path, transformer):
    """Old (non-zip) torch.save files load too, still through weights-only unpickling."""
    p = tmp_path / "legacy.pth"
    torch.save(plain_state(transformer), p, _use_new_zipfile_serialization=False)
    torch.testing.assert_close(transformer_out(load_transformer(p)), transformer_out(transformer), rtol=0, atol=0)
