"""Switti's transformer and its VQ-VAE have exactly the parameter names, shapes and dtypes of the
released checkpoints, and the registry recognises those files, reads their configs from shapes and
tells the default (block-diagonal) model from the AR (block-causal) one by the stored mask.

tests/fixtures/switti_1024.tsv, switti_512.tsv and vqvae_switti.tsv list every entry of the real
files (built on the meta device from the reference code with the released configs). Meta tensors
only: no weights are allocated.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from svare_core.models.arch_switti import DROPPED_KEYS, MASK_KEY, switti_config_from_shapes, vqvae_config_from_shapes
from svare_core.models.checkpoint import Checkpoint, ModelLoadError
from svare_core.models.registry import identify, layout_of, inspect_file
from svare_core.models.switti import Switti, switti_1024, switti_512
from svare_core.models.vqvae import VQVAE, vqvae_switti
from svare_core.schedules import num_tokens, switti_schedule
from tests.test_model_keys import DTYPES, FIXTURES, meta_state, read_table


def checkpoint(name: str, causal: bool | None = False) -> Checkpoint:
    """The table as a Checkpoint of meta tensors; the mask buffer, if ``causal`` is not None, as a
    real zero-memory tensor (expanded) whose one value the registry reads: 0 (AR) or -inf."""
    state = {}
    for k, (shape, dtype) in read_table(name).items():
        if k == MASK_KEY:
            if causal is None:
                continue
            state[k] = torch.full((1,), 0.0 if causal else -math.inf).expand(*shape)
        else:
            state[k] = torch.empty(shape, dtype=DTYPES[dtype], device="meta")
    return Checkpoint(FIXTURES / f"{name}.safetensors", state)


@pytest.mark.parametrize("table,make", [("switti_1024", switti_1024), ("switti_512", switti_512)])
def test_transformer_matches_released_checkpoint(table, make):
    ours = meta_state(Switti, make())
    theirs = {k: v for k, v in read_table(table).items() if k not in DROPPED_KEYS}
    assert sorted(set(theirs) ^ set(ours)) == []
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not wrong
    # the buffers we drop are exactly the release's level ids and training mask
    L = num_tokens(make().scales)
    assert read_table(table)["lvl_1L"][0] == (1, L) and read_table(table)[MASK_KEY][0] == (1, 1, L, L)


def test_vqvae_matches_released_checkpoint():
    ours = meta_state(VQVAE, vqvae_switti())
    theirs = read_table("vqvae_switti")
    ckpt = checkpoint("vqvae_switti")
    found = layout_of(ckpt, "vae")
    assert found.arch.name == "var-vqvae"
    assert sorted(found.names) == sorted(ours)
    assert {theirs[f][0] for f in found.names.values()}  # every file key is mapped
    wrong = {k: (ours[k], theirs[f]) for k, f in found.names.items() if ours[k] != theirs[f]}
    assert not wrong
    assert sorted(found.names.values()) == sorted(theirs)


@pytest.mark.parametrize("table,levels,tokens", [("switti_1024", 14, 9451), ("switti_512", 10, 2240)])
@pytest.mark.parametrize("causal", [False, True])
def test_switti_config_from_shapes(table, levels, tokens, causal):
    ckpt = checkpoint(table, causal)
    assert identify(ckpt).name == "switti"
    cfg = switti_config_from_shapes(ckpt)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.ffn_dim) == (30, 1920, 30, 64, 5120)
    assert (cfg.vocab_size, cfg.code_dim, cfg.text_dim, cfg.pooled_dim, cfg.num_levels) == (4096, 32, 2048, 1280, levels)
    assert cfg.causal is causal and cfg.crop_cond
    assert num_tokens(cfg.scales) == tokens and cfg.scales == switti_schedule(levels)
    expected = switti_1024() if levels == 14 else switti_512()
    assert cfg == type(expected)(**{**expected.to_dict(), "causal": causal})
    found = layout_of(ckpt, "transformer")
    assert set(found.names) == set(meta_state(Switti, cfg))


def test_vqvae_config_from_shapes():
    cfg = vqvae_config_from_shapes(checkpoint("vqvae_switti"))
    assert cfg == vqvae_switti()
    assert (cfg.stride, cfg.vocab_size, cfg.z_channels, cfg.num_phi, cfg.stat_rows) == (16, 4096, 32, 4, 14)
    # VAR's own VAE (10 rows of statistics) is the same architecture
    var = vqvae_config_from_shapes(checkpoint("vae_ch160v4096z32"))
    assert var.stat_rows == 10 and var == type(cfg)(**{**cfg.to_dict(), "stat_rows": 10})


def test_variant_without_mask_needs_config(tmp_path):
    ckpt = checkpoint("switti_512", causal=None)
    ckpt.path = tmp_path / "model.safetensors"
    with pytest.raises(ModelLoadError, match="config.json"):
        switti_config_from_shapes(ckpt)
    (tmp_path / "config.json").write_text('{"depth": 30, "use_ar": true}')
    assert switti_config_from_shapes(ckpt).causal is True


def test_corrupt_mask_refused():
    ckpt = checkpoint("switti_512")
    ckpt.state[MASK_KEY] = torch.full((1,), 3.0).expand(1, 1, 2240, 2240)
    with pytest.raises(ModelLoadError, match="neither 0 nor -inf"):
        layout_of(ckpt, "transformer")
    ckpt.state[MASK_KEY] = torch.zeros(1).expand(1, 1, 680, 680)
    with pytest.raises(ModelLoadError, match="covers 680 tokens"):
        layout_of(ckpt, "transformer")


def test_mask_read_from_a_real_file(tmp_path):
    """The one mask value is read from disk at its offset (a tiny real safetensors file)."""
    from svare_core.models.checkpoint import read_checkpoint
    d = torch.cat([torch.full((s * s,), i) for i, s in enumerate((1, 2, 3))])
    for causal in (False, True):
        mask = torch.where(d[:, None] >= d[None] if causal else d[:, None] == d[None], 0.0, -math.inf)
        path = tmp_path / f"m{causal}.safetensors"
        save_file({MASK_KEY: mask.reshape(1, 1, 14, 14).contiguous(), "x": torch.ones(3)}, str(path))
        ckpt = read_checkpoint(path)
        assert ckpt.read_element(MASK_KEY, 13 * 14) == (0.0 if causal else -math.inf)
        assert ckpt.read_element(MASK_KEY, 13 * 14 + 13) == 0.0


def test_cut_file_gives_one_clear_line(tmp_path):
    # the released key names with one-element tensors: recognised, then refused by its shapes
    path = tmp_path / "vq.safetensors"
    save_file({k: torch.zeros(1, dtype=DTYPES[d]) for k, (_, d) in read_table("vqvae_switti").items()}, str(path))
    with pytest.raises(ModelLoadError, match="looks like a VAR multi-scale VQVAE .* corrupt or incomplete"):
        inspect_file(path)
