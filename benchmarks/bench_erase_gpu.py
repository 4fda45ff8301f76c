"""A few S-VARE steps on Infinity-2B-shaped random weights: time per step and peak GPU memory.

    python benchmarks/bench_erase_gpu.py --config 2b --preset 0.25M --steps 5      # needs a CUDA GPU
    python benchmarks/bench_erase_gpu.py --config tiny --steps 3                  # CPU smoke run

Random weights and random text features (Flan-T5-XL width, 32 tokens) stand in for the real files,
so nothing is downloaded; the numbers are the cost of the method, not of a particular checkpoint.
The run uses the public `erase()` with the settings meant for real models (LoRA rank 4 on the
attention projections, bf16 autocast, gradient checkpointing) and reports the time per iteration
(one erase step + one preservation step) after the auxiliary tokens were generated.
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svare_core.erasure import EraseConfig, PromptPair, erase  # noqa: E402
from svare_core.models.infinity import Infinity, InfinityConfig, infinity_2b  # noqa: E402
from svare_core.models.vae import BSQVAE, VAEConfig  # noqa: E402
from svare_core.pipeline import VARPipeline  # noqa: E402
from svare_core.schedules import infinity_schedule  # noqa: E402


class RandomText:
    """Stands in for Flan-T5-XL: fixed random features per prompt, 32 tokens."""

    def __init__(self, width: int, tokens: int = 32):
        self.width, self.tokens = width, tokens

    def encode(self, prompts):
        gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        feats = torch.stack([torch.randn(self.tokens, self.width, generator=g) for g in gens])
        return feats, torch.ones(len(prompts), self.tokens, dtype=torch.bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["2b", "tiny"], default="2b")
    p.add_argument("--preset", default="0.25M", help="resolution preset of the training schedule (0.06M .. 1M)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--trainable", default="lora", help="lora or a dense set such as xattn_ffn")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.config == "2b":
        cfg = infinity_2b()
    else:
        cfg = InfinityConfig(depth=2, embed_dim=128, num_heads=2, text_dim=64, bits=32, ffn_dim=256,
                             num_block_chunks=1, pool_heads=1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = Infinity(cfg).to(dtype).eval()
    vae = BSQVAE(VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, norm_groups=4)).eval()  # decode only
    pipe = VARPipeline(model, vae.to(device), RandomText(cfg.text_dim), name=f"random-{args.config}")
    pairs = [PromptPair("a photo of a nude person", "a photo of a dressed person", "nude"),
             PromptPair("a nude woman on the beach", "a dressed woman on the beach", "nude")]
    config = EraseConfig(steps=args.steps, lr=2.3e-5, trainable=args.trainable, lora_rank=4, pairs_per_step=2,
                         precision="bf16" if device.type == "cuda" else "fp32",
                         gradient_checkpointing=device.type == "cuda", teacher_cfg=4.0)
    scales = infinity_schedule("1:1", args.preset)
    stamps: list[float] = []
    t0 = time.time()
    result = erase(pipe, pairs, config, scales=scales, callback=lambda s: stamps.append(time.time()))
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else float("nan")
    tokens = sum(h * w for h, w in scales)
    print("| config | device | preset | tokens | trainable | s/iteration | peak GPU memory (GB) | total (s) |")
    print("|---|---|---|---|---|---|---|---|")
    peak = f"{result.peak_memory_mb / 1024:.1f}" if result.peak_memory_mb else "-"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"| {args.config} | {name} | {args.preset} | {tokens} | {args.trainable} | {per_step:.2f} | {peak} | "
          f"{time.time() - t0:.0f} |")


if __name__ == "__main__":
    main()
