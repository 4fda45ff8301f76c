"""Train the embedded toy model: a BSQ VAE, then an Infinity transformer, on the procedural world.

Stages (each resumable, each seeded):
  1. vae         - autoencoder through the multi-scale bitwise quantiser
  2. encode      - render the training set once, encode it to latents, encode its captions
  3. transformer - next-scale prediction with bitwise self-correction and condition dropout
  4. export      - write the shipped model file (project format)
``python -m svare_core.toyworld train --out runs/toyworld`` runs all of them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.format import atomic_save_safetensors, load_unique_state_dict, save_model, unique_state_dict
from ..models.infinity import Infinity, InfinityConfig
from ..models.text import TextEncoder, minilm_path
from ..models.vae import BSQVAE, VAEConfig
from ..models.bitwise import bit_losses, quantize_multiscale
from . import world

TOY_SCALES = [(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)]


def toy_vae_config() -> VAEConfig:
    return VAEConfig(ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1, z_channels=32, norm_groups=8)


def toy_transformer_config() -> InfinityConfig:
    return InfinityConfig(depth=4, embed_dim=256, num_heads=4, text_dim=384, bits=32, ffn_dim=1024,
                          num_block_chunks=1, num_levels=15, text_max_len=64, pool_heads=4,
                          rope_grid=(8, 8), scales=list(TOY_SCALES))


@dataclass
class TrainSettings:
    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 5e-4
    num_images: int = 60000
    steps: int = 2400
    batch: int = 48
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.02
    cond_drop: float = 0.1
    flip_prob: float = 0.2
    threads: int = 1                # torch threads: 1 is fastest on a shared 2-core machine
    minutes: float = 0.0            # >0: stop the transformer stage after this wall time (still resumable)


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_state(path: Path, module, opt, step: int) -> None:
    atomic_save_safetensors(unique_state_dict(module), path.with_suffix(".safetensors"), {"step": str(step)})
    tmp = path.with_suffix(".opt.tmp")
    torch.save({"opt": opt.state_dict(), "step": step, "rng": torch.get_rng_state()}, tmp)
    tmp.replace(path.with_suffix(".opt"))


def _load_state(path: Path, module, opt) -> int:
    from safetensors.torch import load_file
    if not path.with_suffix(".safetensors").exists() or not path.with_suffix(".opt").exists():
        return 0
    load_unique_state_dict(module, load_file(str(path.with_suffix(".safetensors"))))
    state = torch.load(path.with_suffix(".opt"), weights_only=True)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Pixel loss of an autoencoder on toy images. The shape covers a small part of the image: its
    pixels weigh more, or the background dominates the loss and colours and patterns are learned late."""
    fg = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
    w = 1 + 4 * fg
    err = rec - x
    return (w * err**2).mean() + 0.2 * (w * err.abs()).mean()


# -- stage 1 --------------------------------------------------------------------------------------
def train_vae(out: Path, s: TrainSettings) -> BSQVAE:
    torch.manual_seed(s.seed)
    vae = BSQVAE(toy_vae_config())
    opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    ckpt = out / "vae"
    step = _load_state(ckpt, vae, opt)
    bar = tqdm(range(step, s.vae_steps), desc="vae", initial=step, total=s.vae_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, s.vae_steps, s.vae_lr, 50)
        images, _, _ = world.make_dataset(s.vae_batch, s.seed + 1, offset=step * s.vae_batch, include_held_out=True)
        x = _images_to_tensor(images)
        rec, commit = vae(x, TOY_SCALES)
        loss = reconstruction_loss(rec, x) + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 200 == 0 or step + 1 == s.vae_steps:
            _save_state(ckpt, vae, opt, step + 1)
    return vae.eval()


# -- stage 2 --------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(out: Path, vae: BSQVAE, s: TrainSettings) -> Path:
    path = out / "dataset.safetensors"
    if path.exists():
        return path
    latents, caption_ids, captions, index = [], [], [], {}
    for off in tqdm(range(0, s.num_images, 1000), desc="encode images"):
        images, caps, _ = world.make_dataset(min(1000, s.num_images - off), s.seed + 2, offset=off)
        latents.append(vae.encode_latent(_images_to_tensor(images)).half())
        for c in caps:
            caption_ids.append(index.setdefault(c, len(index)))
    captions = list(index)
    feats, lengths = encode_captions(captions)
    atomic_save_safetensors({"latents": torch.cat(latents), "caption_ids": torch.tensor(caption_ids),
                             "text": feats, "text_len": lengths}, path, {"captions": json.dumps(captions)})
    return path


@torch.no_grad()
def encode_captions(captions: list[str], max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> their MiniLM features (N, max_len, 384) in fp16, zero-padded, and their lengths (N,)."""
    enc = TextEncoder(minilm_path())
    feats, lengths = [], []
    for i in tqdm(range(0, len(captions), 256), desc="encode captions"):
        f, m = enc.encode(captions[i:i + 256])
        feats.append(F.pad(f, (0, 0, 0, max_len - f.shape[1])).half())
        lengths.append(m.sum(1))
    return torch.cat(feats), torch.cat(lengths)


# -- stage 3 --------------------------------------------------------------------------------------
def scale_weights(scales) -> torch.Tensor:
    """Per-token loss weights: each scale's tokens weigh 1/sqrt(h*w), normalised to mean 1."""
    w = torch.cat([torch.full((h * w,), (h * w) ** -0.5) for h, w in scales])
    return w * (w.numel() / w.sum())


def fit_transformer(out: Path, model: torch.nn.Module, s, batch_loss: Callable[[torch.Generator], torch.Tensor]):
    """The transformer stage's loop, shared by the toy models: AdamW (no decay on vectors and the learned
    unconditional text), cosine learning rate, gradient clipping, a log line every 25 steps and a
    resumable checkpoint every 250. ``batch_loss(generator)`` draws one batch and returns its loss."""
    decays = lambda n, p: p.dim() >= 2 and "cfg_uncond" not in n          # noqa: E731
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.97))
    ckpt = out / "transformer"
    step = _load_state(ckpt, model, opt)
    gen = torch.Generator().manual_seed(s.seed + step)
    start, log, done = time.time(), open(out / "transformer_log.jsonl", "a"), step
    bar = tqdm(range(step, s.steps), desc="transformer", initial=step, total=s.steps)
    for step in bar:
        if s.minutes and time.time() - start > s.minutes * 60:
            break
        lr = _cosine_lr(step, s.steps, s.lr, s.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = batch_loss(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0:
            log.write(json.dumps({"step": step, "loss": loss.item(), "grad_norm": gn.item(), "lr": lr,
                                  "t": time.time() - start}) + "\n")
            log.flush()
        done = step + 1
        if done % 250 == 0:
            _save_state(ckpt, model, opt, done)
    _save_state(ckpt, model, opt, done)
    return model.eval()


def train_transformer(out: Path, data_path: Path, s: TrainSettings) -> Infinity:
    from safetensors.torch import load_file
    torch.manual_seed(s.seed)      # the model's initial weights
    data = load_file(str(data_path))
    latents, cap_ids, text, text_len = data["latents"], data["caption_ids"], data["text"], data["text_len"]
    model = Infinity(toy_transformer_config())
    weights = scale_weights(TOY_SCALES)

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, latents.shape[0], (s.batch,), generator=gen)
        labels, x_in, _ = quantize_multiscale(latents[idx].float(), TOY_SCALES, flip_prob=s.flip_prob, generator=gen)
        labels = torch.cat(labels, dim=1)
        ci = cap_ids[idx]
        L = int(text_len[ci].max())
        feats = text[ci, :L].float()
        mask = torch.arange(L)[None] < text_len[ci][:, None]
        drop = torch.rand(s.batch, generator=gen) < s.cond_drop
        feats = model.drop_condition(feats, mask, drop)
        logits = model(model.encode_text(feats, mask), x_in, TOY_SCALES)
        return (bit_losses(logits, labels).mean(-1) * weights).mean()

    return fit_transformer(out, model, s, batch_loss)


def trained_steps(out: Path) -> int:
    """The steps the transformer checkpoint in ``out`` has trained."""
    from safetensors import safe_open
    with safe_open(str((out / "transformer").with_suffix(".safetensors")), "pt") as f:
        return int(f.metadata()["step"])


def start_run(out: str | Path, s) -> Path:
    """The working folder, made, with the run's settings written and the thread count set."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s.threads)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=1))
    return out


# -- stage 4 --------------------------------------------------------------------------------------
def export(out: Path, dest: Path, vae: BSQVAE, model: Infinity, s: TrainSettings, steps: int) -> Path:
    return save_model(dest, transformer=model, vae=vae, text_encoder="minilm", scales=TOY_SCALES,
                      extra={"name": "toyworld", "family": "toyworld", "train_settings": asdict(s), "transformer_steps": steps})


def train_all(out: str | Path, s: TrainSettings, dest: str | Path | None = None) -> Path:
    out = start_run(out, s)
    vae = train_vae(out, s)
    data = encode_dataset(out, vae, s)
    model = train_transformer(out, data, s)
    return export(out, Path(dest) if dest else out / "toyworld.safetensors", vae, model, s, trained_steps(out))
