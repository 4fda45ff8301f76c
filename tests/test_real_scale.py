"""What breaks only at real size, caught on small files: tensors above 2**24 elements, memory when
a checkpoint streams in at a lower precision, sharded safetensors, loads that cannot fit.

Each test writes at most a few hundred MB (benchmarks/real_scale.py runs the real 2B/8B shapes)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svare_core.erasure.patches import ErasurePatch, apply_patch, remove_patch
from svare_core.models import registry
from svare_core.models.format import sample_indices, state_dict_fingerprint
from svare_core.models.infinity import Infinity
from svare_core.models import ModelLoadError, load_transformer
from svare_core.models.vae import BSQVAE
from svare_core.pipeline import VARPipeline

from conftest import randomise, tiny_transformer_config, tiny_vae_config

ROOT = Path(__file__).resolve().parents[1]
BIG = 2**24 + 2048          # elements: float32 index arithmetic is inexact from 2**24 on


# -- fingerprints ------------------------------------------------------------------------------------
def test_sample_indices_are_exact_above_2_24():
    for n in (1, 2, 4095, 4096, 4097, 2**24 + 1, 25_165_824, 2**31 + 3):
        idx = sample_indices(n)
        assert idx.dtype == torch.int64 and idx[0] == 0 and idx[-1] == n - 1
        assert len(idx) == min(4096, n) and bool((idx[1:] > idx[:-1]).all())


def test_fingerprint_of_a_tensor_above_2_24_elements():
    t = torch.randn(BIG)
    fp = state_dict_fingerprint({"w": t})
    changed = t.clone()
    changed[-1] += 1.0                       # the last element is always sampled
    assert state_dict_fingerprint({"w": changed}) != fp
    # the same weights held in bf16 keep the base fingerprint; the exact one tells them apart
    bf = t.bfloat16()
    assert state_dict_fingerprint({"w": bf}) == state_dict_fingerprint({"w": bf.float()})
    assert state_dict_fingerprint({"w": bf}, exact=True) != state_dict_fingerprint({"w": bf.float()}, exact=True)


class _Text:
    """A text encoder's interface with random features (the width is what the transformer checks)."""

    def __init__(self, width: int):
        self.width = width

    def encode(self, prompts):
        return torch.randn(len(prompts), 3, self.width), torch.ones(len(prompts), 3, dtype=torch.bool)


def test_patch_on_a_tensor_above_2_24_saves_applies_stacks_and_comes_off_exactly(tmp_path):
    # cfg_uncond is (text_max_len, text_dim): 8193 x 2048 = 16,779,264 elements, the rest is tiny
    cfg = tiny_transformer_config(text_dim=2048, text_max_len=8193, pool_heads=16)
    torch.manual_seed(0)
    transformer = randomise(Infinity(cfg)).eval()
    big = "cfg_uncond"
    assert transformer.state_dict()[big].numel() > 2**24
    pipe = VARPipeline(transformer, BSQVAE(tiny_vae_config()).eval(), _Text(2048), name="big")
    base = {k: v.clone() for k, v in transformer.state_dict().items()}

    def patch(seed: int) -> ErasurePatch:
        g = torch.Generator().manual_seed(seed)
        return ErasurePatch({big: torch.randn(base[big].shape, generator=g) * 0.01},
                            {"concepts": [f"c{seed}"], "base_fingerprint": pipe.base_fingerprint})

    p1, p2 = patch(1).save(tmp_path / "p1.safetensors"), patch(2).save(tmp_path / "p2.safetensors")
    a, b = ErasurePatch.load(p1), ErasurePatch.load(p2)
    one = apply_patch(pipe, a, 0.5)
    both = apply_patch(one, b, 1.0)
    expected = base[big] + 0.5 * a.tensors[big] + b.tensors[big]
    torch.testing.assert_close(both.transformer.state_dict()[big], expected, rtol=0, atol=1e-6)
    assert both.fingerprint() != pipe.fingerprint() != one.fingerprint()
    only_b = remove_patch(both, 0)
    assert torch.equal(only_b.transformer.state_dict()[big], apply_patch(pipe, b).transformer.state_dict()[big])
    back = remove_patch(only_b, 0)
    for k, v in back.transformer.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert back.fingerprint() == pipe.fingerprint()


# -- streaming loads ---------------------------------------------------------------------------------
def _medium_state() -> tuple[dict[str, torch.Tensor], object]:
    """An Infinity-shaped state dict of about 300 MB in fp32 (75M parameters)."""
    cfg = tiny_transformer_config(depth=4, embed_dim=1024, num_heads=8, text_dim=1024, ffn_dim=4096,
                                  num_block_chunks=2, text_max_len=64, pool_heads=8)
    with torch.device("meta"):
        model = Infinity(cfg)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}
    return state, cfg


@pytest.fixture(scope="module")
def medium_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("medium")
    state, _ = _medium_state()
    torch.save(state, folder / "model.pth")                       # the 2B's release format: a plain pickle
    keys = list(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]      # the 8B's: safetensors shards + an index
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k].bfloat16() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save(dict(randomise(Infinity(tiny_transformer_config())).state_dict()), folder / "tiny.pth")
    return {"pth": folder / "model.pth", "index": folder / "model.safetensors.index.json", "tiny": folder / "tiny.pth"}


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from svare_core.models import load_transformer
    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
    torch.set_num_threads(1)
    # A first, tiny load pages in the library code the load runs (about 90 MB of libtorch), which is
    # not the model's memory; the peak is read against what the process holds after it.
    del_me = load_transformer(sys.argv[2], dtype=torch.bfloat16)
    del del_me
    before = rss("VmRSS")
    model = load_transformer(sys.argv[1], dtype=torch.bfloat16)
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    print(json.dumps({"growth": rss("VmHWM") - before, "weights": weights,
                      "dtypes": sorted({str(v.dtype) for v in model.state_dict().values()})}))
""")


@pytest.mark.parametrize("kind", ["pth", "index"])
def test_a_bf16_load_grows_memory_by_about_the_bf16_bytes(medium_files, kind):
    """Peak RSS growth of a fresh process loading ~300 MB of weights in bf16 stays under 1.3x the bf16
    bytes plus 48 MB (the old loader built the fp32 model and held the file too: about 5x)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(medium_files[kind]), str(medium_files["tiny"])],
                         capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["weights"] > 140e6
    assert r["growth"] < 1.3 * r["weights"] + 48 * 2**20, r


def test_sharded_and_pickled_copies_load_to_the_same_model(medium_files):
    a = load_transformer(medium_files["pth"], dtype=torch.bfloat16)
    b = load_transformer(medium_files["index"], dtype=torch.bfloat16)   # stored in bf16
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # one base fingerprint for the fp32 release and its bf16 copy, whatever the load precision
    assert a.source_fingerprint == b.source_fingerprint == load_transformer(medium_files["index"]).source_fingerprint
    assert a.source_fingerprint == state_dict_fingerprint(_medium_state()[0])


def test_a_sharded_index_with_a_missing_or_foreign_shard_is_refused(medium_files, tmp_path):
    index = json.loads(medium_files["index"].read_text())
    key = next(iter(index["weight_map"]))
    broken = medium_files["index"].with_name("broken.index.json")   # next to the shards it names
    broken.write_text(json.dumps({"weight_map": {**index["weight_map"], key: "model-00009-of-00009.safetensors"}}))
    with pytest.raises(ModelLoadError, match="shard model-00009-of-00009.safetensors is missing"):
        load_transformer(broken)
    outside = tmp_path / "sub" / "model.safetensors.index.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps({"weight_map": {key: "../../etc/passwd"}}))
    with pytest.raises(ModelLoadError, match="outside its folder"):
        load_transformer(outside)


def test_a_truncated_safetensors_file_is_refused_before_loading(tmp_path):
    state = {k: v for k, v in randomise(Infinity(tiny_transformer_config())).state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_transformer(path)


def test_nan_weights_are_refused_at_load(tmp_path):
    state = dict(randomise(Infinity(tiny_transformer_config())).state_dict())
    state["head.weight"] = state["head.weight"].clone()
    state["head.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(ModelLoadError, match="head.weight holds NaN"):
        load_transformer(tmp_path / "m.pth")


def test_a_load_that_cannot_fit_is_refused_before_allocating(tmp_path, monkeypatch):
    torch.save(dict(randomise(Infinity(tiny_transformer_config())).state_dict()), tmp_path / "m.pth")
    monkeypatch.setattr(registry, "_free_bytes", lambda device: 1000)
    allocated = []
    real_to_empty = torch.nn.Module.to_empty
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: allocated.append(1) or real_to_empty(self, **kw))
    with pytest.raises(ModelLoadError, match=r"needs 0\.0 GB of RAM but only 0\.0 GB are free on cpu: load it in bf16"):
        load_transformer(tmp_path / "m.pth")
    assert not allocated


# -- the text encoder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    from transformers import T5Config, T5EncoderModel

    from svare_core.models.text import minilm_path

    folder = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(num_layers=2, d_model=64, d_ff=128, num_heads=2, d_kv=32, vocab_size=32128,
                            feed_forward_proj="gated-gelu")).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((minilm_path() / name).read_bytes())
    return folder


def test_t5_streams_in_bf16_by_default_and_matches_transformers(tiny_t5):
    from transformers import T5EncoderModel

    from svare_core.models.text import TextEncoder

    enc = TextEncoder(tiny_t5)
    assert enc.dtype == torch.bfloat16
    full = TextEncoder(tiny_t5, dtype=torch.float32)
    ref = T5EncoderModel.from_pretrained(tiny_t5, local_files_only=True, dtype=torch.float32).eval()
    ours, theirs = full.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    prompts = ["a red star", "a photo of a cat on a sofa"]
    feats, mask = full.encode(prompts)
    batch = full.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
    torch.testing.assert_close(feats[mask], expected[batch["attention_mask"].bool()])
    bf_feats, _ = enc.encode(prompts)
    assert (bf_feats - feats).abs().max() < 0.1 * feats.abs().max()


def test_offload_is_off_on_the_cpu_and_features_are_cached(tiny_t5):
    from svare_core.models.text import TextEncoder

    enc = TextEncoder(tiny_t5, offload=True)
    assert not enc.offload and enc.device.type == "cpu"
    first, _ = enc.encode(["a red star"])
    calls = []
    enc._encode_uncached = lambda prompts: calls.append(prompts)
    again, _ = enc.encode(["a red star"])
    assert torch.equal(first, again) and not calls


def test_a_text_encoder_of_the_wrong_width_is_refused_before_the_transformer_loads(tiny_t5, tmp_path, monkeypatch):
    from svare_core import load_pipeline

    torch.save(dict(randomise(Infinity(tiny_transformer_config())).state_dict()), tmp_path / "m.pth")  # text_dim 384
    torch.save({"vae": dict(BSQVAE(tiny_vae_config()).state_dict())}, tmp_path / "vae.pth")
    loads = []
    monkeypatch.setattr("svare_core.loader.load_transformer", lambda *a, **k: loads.append(a))
    with pytest.raises(ModelLoadError, match="gives 64-wide features but m.pth expects 384"):
        load_pipeline(tmp_path / "m.pth", vae=tmp_path / "vae.pth", text_encoder=tiny_t5)
    with pytest.raises(ModelLoadError, match="holds no VAE"):
        load_pipeline(tmp_path / "m.pth", text_encoder=tiny_t5)
    assert not loads
