"""Shared fixtures: tiny real models (random weights) and the real offline MiniLM text encoder."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLI, the demo and the nodes keep an erasure cache by default: tests keep theirs in a folder of
# their own, never in the user's ~/.cache.
os.environ["SVARE_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="svare_test_cache_")

import pytest
import torch

# On a shared 2-core machine a second torch thread mostly spins: one thread is many times faster.
torch.set_num_threads(1)

from svare_core.models.infinity import Infinity, InfinityConfig
from svare_core.models.text import TextEncoder, minilm_path
from svare_core.models.vae import BSQVAE, VAEConfig
from svare_core.pipeline import VARPipeline

TINY_SCALES = [(1, 1), (2, 2), (3, 3), (4, 4)]


def tiny_transformer_config(**kw) -> InfinityConfig:
    base = dict(depth=2, embed_dim=64, num_heads=2, text_dim=384, bits=8, ffn_dim=128, num_block_chunks=2,
                num_levels=15, text_max_len=64, pool_heads=2, rope_grid=(4, 4), scales=list(TINY_SCALES))
    base.update(kw)
    return InfinityConfig(**base)


def tiny_vae_config(**kw) -> VAEConfig:
    base = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4)
    base.update(kw)
    return VAEConfig(**base)


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every float tensor non-trivial values, so outputs depend on all weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="session")
def text_encoder() -> TextEncoder:
    return TextEncoder(minilm_path())


@pytest.fixture()
def tiny_pipeline(text_encoder) -> VARPipeline:
    torch.manual_seed(0)
    transformer = randomise(Infinity(tiny_transformer_config())).eval()
    vae = randomise(BSQVAE(tiny_vae_config()), seed=1).eval()
    return VARPipeline(transformer, vae, text_encoder, name="tiny", scales=list(TINY_SCALES))
