"""Our modules have exactly the parameter names, shapes and dtypes of the released checkpoints, and the
loader recognises those checkpoints (and the VAR ones it does not support) from keys and shapes alone.

The tables in tests/fixtures/*.tsv were dumped from the real files (key, shape, dtype). Everything
here runs on the meta device: no weights are allocated.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svare_core.models.infinity import Infinity, infinity_2b, infinity_8b
from svare_core.models.arch_infinity import infinity_config_from_shapes
from svare_core.models.arch_infinity_vae import vae_config_from_shapes
from svare_core.models.checkpoint import Checkpoint
from svare_core.models.registry import identify, inspect_file
from svare_core.models.vae import BSQVAE, vae_d32, vae_d56_patchify

FIXTURES = Path(__file__).parent / "fixtures"

DTYPES = {"torch.float32": torch.float32, "torch.int64": torch.int64, "torch.bfloat16": torch.bfloat16,
          "torch.float16": torch.float16}


def read_table(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    table = {}
    for line in (FIXTURES / f"{name}.tsv").read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").replace(" ", "").split(",") if x)
        assert key not in table, f"duplicate key {key} in {name}.tsv"
        table[key] = (dims, dtype)
    return table


def meta_checkpoint(name: str) -> Checkpoint:
    """A Checkpoint holding meta tensors with exactly the table's shapes and dtypes."""
    state = {k: torch.empty(shape, dtype=DTYPES[dtype], device="meta") for k, (shape, dtype) in read_table(name).items()}
    return Checkpoint(FIXTURES / f"{name}.pth", state)


def meta_state(module_cls, cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    with torch.device("meta"):
        module = module_cls(cfg)
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()}


CASES = [
    ("infinity_2b", Infinity, infinity_2b),
    ("infinity_8b", Infinity, infinity_8b),
    ("infinity_vae_d32", BSQVAE, vae_d32),
    ("infinity_vae_d56_f8_14_patchify", BSQVAE, vae_d56_patchify),
]


@pytest.mark.parametrize("table,module_cls,make_cfg", CASES, ids=[c[0] for c in CASES])
def test_module_matches_released_checkpoint(table, module_cls, make_cfg):
    ours = meta_state(module_cls, make_cfg())
    theirs = read_table(table)
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not wrong, f"shape/dtype mismatches (ours, released): {dict(list(wrong.items())[:10])}"


def test_infinity_2b_inferred_from_shapes():
    ckpt = meta_checkpoint("infinity_2b")
    assert identify(ckpt).name == "infinity"
    cfg = infinity_config_from_shapes(ckpt)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.bits, cfg.ffn_dim, cfg.num_block_chunks) == (32, 2048, 16, 32, 8192, 8)
    assert (cfg.text_dim, cfg.text_max_len, cfg.pool_heads, cfg.num_levels) == (2048, 512, 16, 15)
    assert cfg.head_dim == 128
    assert cfg == infinity_2b()


def test_infinity_8b_inferred_from_shapes():
    ckpt = meta_checkpoint("infinity_8b")
    assert identify(ckpt).name == "infinity"
    cfg = infinity_config_from_shapes(ckpt)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.bits, cfg.ffn_dim) == (40, 3584, 28, 56, 14336)
    assert (cfg.pool_heads, cfg.text_dim, cfg.num_block_chunks, cfg.head_dim) == (16, 2048, 8, 128)
    assert cfg == infinity_8b()


def test_vae_d32_inferred_from_shapes():
    ckpt = meta_checkpoint("infinity_vae_d32")
    assert identify(ckpt).name == "infinity-vae"
    cfg = vae_config_from_shapes(ckpt)
    assert cfg == vae_d32()
    assert (cfg.stride, cfg.bits) == (16, 32)


def test_vae_d56_inferred_from_shapes():
    ckpt = meta_checkpoint("infinity_vae_d56_f8_14_patchify")
    assert identify(ckpt).name == "infinity-vae"
    cfg = vae_config_from_shapes(ckpt)
    # The 2x2 patchify is not in the weights: load_vae(token_bits=56) sets it (tested in test_loading).
    assert cfg == dataclasses.replace(vae_d56_patchify(), patch_size=1)
    assert (cfg.z_channels, cfg.ch_mult, cfg.stride) == (14, (1, 2, 4, 4), 8)
    assert dataclasses.replace(cfg, patch_size=2).bits == 56 == infinity_8b().bits


def test_infinity_2b_and_vae_pair_up():
    assert infinity_2b().bits == vae_d32().bits
    assert infinity_8b().bits == vae_d56_patchify().bits
    assert vae_d56_patchify().stride == vae_d32().stride == 16


@pytest.mark.parametrize("table,family", [("var_d16", "var"), ("var_d30", "var"), ("vae_ch160v4096z32", "var-vqvae")])
def test_var_checkpoints_recognised(table, family):
    assert identify(meta_checkpoint(table)).name == family


@pytest.mark.parametrize("table,family", [("var_d16", "var")])   # VAR's VQVAE loads: it is Switti's tokenizer
def test_var_files_reported_unsupported(tmp_path, table, family):
    # A real file with the table's key names (one-element tensors: only names matter for detection).
    path = tmp_path / f"{table}.safetensors"
    save_file({k: torch.zeros(1, dtype=DTYPES[d]) for k, (_, d) in read_table(table).items()}, str(path))
    info = inspect_file(path)
    assert info.family == family
    assert info.supported is False
    assert info.config == {}
    summary = info.summary()
    assert str(path) in summary and family in summary and "not yet" in summary
