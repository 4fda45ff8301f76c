"""Infinity and Switti at real size, with random weights in the released file layouts: load, sample, erase.

    python benchmarks/real_scale.py --out /data/svare-real --write          # the files (about 60 GB)
    python benchmarks/real_scale.py --out /data/svare-real --json docs/real_scale.json
    python benchmarks/real_scale.py --out /data/svare-real --jobs load_2b_bf16,sample_2b_256
    python benchmarks/real_scale.py --table docs/real_scale.json            # the markdown table

The files are built from the key/shape tables in tests/fixtures/ and saved the way the release
saves them: Infinity-2B as one plain fp32 .pth pickle, its VAE with the weights under "vae",
Infinity-8B as 4 safetensors shards + model.safetensors.index.json (fp32-stored and bf16-stored
copies), the 8B VAE, and a Flan-T5-XL-shaped text encoder (width 2048; few layers, the
toy model's tokenizer, which ships offline), and Switti's text towers as ComfyUI keeps them:
clip_l.safetensors and clip_g.safetensors, fp16, every layer (tests/fixtures/clip_*_text.tsv).
Every job runs in a fresh process; its peak RSS comes from the kernel (wait4), its timings from the
job itself. CUDA jobs are skipped without a GPU.

Switti (--files switti_1024,vqvae_switti): Switti-1024's 705 entries as one safetensors file with
its real buffers (the block-diagonal training mask, fp32, and the level ids), the weights stored in
bf16 (5.5 GB instead of the release's 10.2 GB fp32: the streaming loader casts per tensor, so
peak memory does not depend on the stored dtype), and VQVAE-Switti in fp32. Its text encoders are
measured by the clip_l / clip_g jobs; the Switti sample job feeds random 2048-wide features and pooled
vectors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
T5_LAYERS = 2            # the real Flan-T5-XL encoder has 24 (1.2B parameters); the width is what matters here
T5_XL = dict(d_model=2048, d_ff=5120, num_heads=32, d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu",
             relative_attention_num_buckets=32,
             relative_attention_max_distance=128, layer_norm_epsilon=1e-6)


# -- writing the files ------------------------------------------------------------------------------------
def read_table(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip():
            key, shape, _ = line.split("\t")
            rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())))
    return rows


def random_tensor(shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def random_state(rows, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: random_tensor(s, dtype, i) for i, (k, s) in enumerate(rows)}


_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_safetensors_streaming(path: Path, rows, dtype, seed0: int = 0, fixed: dict | None = None) -> int:
    """A safetensors file written one tensor at a time (the writer never holds the whole shard).
    ``fixed``: key -> a function giving that tensor's real value (buffers such as Switti's mask)."""
    fixed = fixed or {}
    dtypes = {k: fixed[k]().dtype if k in fixed else dtype for k, _ in rows}
    header, offset = {}, 0
    for k, s in rows:
        n = math.prod(s) * dtypes[k].itemsize
        header[k] = {"dtype": _ST[dtypes[k]], "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (k, s) in enumerate(rows):
            t = fixed[k]() if k in fixed else random_tensor(s, dtype, seed0 + i)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    os.replace(tmp, path)
    return offset


def write_sharded(folder: Path, rows, dtype, shards: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(math.prod(s) for _, s in rows) * dtype.itemsize
    groups, acc, cur = [[] for _ in range(shards)], 0, 0
    for k, s in rows:
        if acc > (cur + 1) * total / shards and cur < shards - 1:
            cur += 1
        groups[cur].append((k, s))
        acc += math.prod(s) * dtype.itemsize
    weight_map, seed = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors_streaming(folder / name, group, dtype, seed)
        seed += len(group)
        weight_map.update({k: name for k, _ in group})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index


def write_text_encoder(folder: Path, layers: int = T5_LAYERS) -> Path:
    from transformers import T5Config, T5EncoderModel

    from svare_core.models.text import minilm_path

    folder.mkdir(parents=True, exist_ok=True)
    cfg = T5Config(num_layers=layers, **T5_XL)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(folder, safe_serialization=True)
    src = minilm_path()   # a tokenizer that ships offline; its ids (< 30522) fit T5's vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def switti_buffers(levels: int) -> dict:
    """Switti's stored buffers with their real values: level ids and the default model's
    block-diagonal mask (0 within a scale, -inf across), as the release holds them."""
    from svare_core.schedules import switti_schedule
    ids = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(switti_schedule(levels))])
    L = len(ids)
    return {"lvl_1L": lambda: ids.view(1, L).long(),
            "attn_bias_for_masking": lambda: torch.where(ids[:, None] == ids[None, :], 0.0, -math.inf).view(1, 1, L, L)}


def files(out: Path) -> dict[str, Path]:
    return {"2b": out / "infinity_2b_reg.pth", "vae_2b": out / "infinity_vae_d32reg.pth",
            "8b_fp32": out / "infinity_8b_fp32" / "model.safetensors.index.json",
            "8b_bf16": out / "infinity_8b_bf16" / "model.safetensors.index.json",
            "vae_8b": out / "infinity_vae_d56_f8_14_patchify.pth", "t5": out / "flan-t5-xl-shaped",
            "clip_l": out / "clip_l.safetensors", "clip_g": out / "clip_g.safetensors",
            "switti_1024": out / "switti_1024" / "model.safetensors",
            "vqvae_switti": out / "vqvae_switti" / "model.safetensors"}


def write_all(out: Path, which: list[str]) -> None:
    f = files(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {
        "2b": lambda: torch.save(random_state(read_table("infinity_2b.tsv")), f["2b"]),
        "vae_2b": lambda: torch.save({"vae": random_state(read_table("infinity_vae_d32.tsv"))}, f["vae_2b"]),
        "vae_8b": lambda: torch.save({"vae": random_state(read_table("infinity_vae_d56_f8_14_patchify.tsv"))},
                                     f["vae_8b"]),
        "8b_fp32": lambda: write_sharded(f["8b_fp32"].parent, read_table("infinity_8b.tsv"), torch.float32),
        "8b_bf16": lambda: write_sharded(f["8b_bf16"].parent, read_table("infinity_8b.tsv"), torch.bfloat16),
        "t5": lambda: write_text_encoder(f["t5"]),
        "clip_l": lambda: write_safetensors_streaming(f["clip_l"], read_table("clip_l_text.tsv"), torch.float16),
        "clip_g": lambda: write_safetensors_streaming(f["clip_g"], read_table("clip_g_text.tsv"), torch.float16),
        "switti_1024": lambda: write_safetensors_streaming(f["switti_1024"], read_table("switti_1024.tsv"),
                                                           torch.bfloat16, fixed=switti_buffers(14)),
        "vqvae_switti": lambda: write_safetensors_streaming(f["vqvae_switti"], read_table("vqvae_switti.tsv"),
                                                            torch.float32),
    }
    for name in which:
        if f[name].exists():
            print(f"  {f[name]} exists", flush=True)
            continue
        t0 = time.time()
        f[name].parent.mkdir(parents=True, exist_ok=True)
        steps[name]()
        print(f"  wrote {f[name]} in {time.time() - t0:.0f} s", flush=True)


# -- jobs (each runs in a child process) -------------------------------------------------------------------
def _rss_now() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))


def _pipeline(f, dtype: str, device: str = "cpu", text_device: str = "cpu", text_offload: bool = False):
    from svare_core import load_pipeline
    return load_pipeline(f["2b"], vae=f["vae_2b"], text_encoder=f["t5"], dtype=dtype, device=device,
                         vae_device="cpu", text_device=text_device, text_offload=text_offload)


def _load(key: str, dtype: str):
    def job(f):
        from svare_core.loader import DTYPES
        from svare_core.models import load_transformer
        t0 = time.time()
        model = load_transformer(f[key], dtype=DTYPES[dtype])
        seconds = time.time() - t0
        from svare_core.models.format import state_dict_fingerprint
        t1 = time.time()
        exact = state_dict_fingerprint(model.state_dict(), exact=True)
        fp_s = time.time() - t1
        n = sum(p.numel() for p in model.state_dict().values())
        return {"seconds": seconds, "params": n, "fingerprint_seconds": fp_s,
                "source_fingerprint": model.source_fingerprint, "exact_fingerprint": exact,
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values())}
    return job


def _load_vae(key: str, dtype: str):
    def job(f):
        from svare_core.loader import DTYPES
        from svare_core.models import load_vae
        t0 = time.time()
        model = load_vae(f[key], dtype=DTYPES[dtype])
        return {"seconds": time.time() - t0, "params": sum(p.numel() for p in model.state_dict().values()),
                "source_fingerprint": model.source_fingerprint,
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values())}
    return job


def _text(dtype: str | None):
    def job(f):
        from svare_core.loader import DTYPES
        from svare_core.models.text import TextEncoder
        t0 = time.time()
        enc = TextEncoder(f["t5"], dtype=DTYPES[dtype] if dtype else None)
        load_s = time.time() - t0
        feats, _ = enc.encode(["a photo of a cat on a sofa"])
        n = sum(p.numel() for p in enc.model.parameters())
        from transformers import T5Config, T5EncoderModel
        with torch.device("meta"):   # the real 24-layer encoder, counted without memory
            full = sum(p.numel() for p in T5EncoderModel(T5Config(num_layers=24, **T5_XL)).parameters())
        return {"seconds": load_s, "params": n, "layers": T5_LAYERS, "params_24_layers": full,
                "bytes_24_layers": full * enc.dtype.itemsize, "dtype": str(enc.dtype), "width": feats.shape[-1],
                "weight_bytes": sum(p.numel() * p.element_size() for p in enc.model.parameters())}
    return job


def _rss_with_transformers() -> int:
    """RSS once transformers' CLIP classes are imported: the part of the peak that is code, not weights."""
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    return _rss_now()


def _clip_text(key: str, dtype: str):
    def job(f):
        from svare_core.loader import DTYPES
        from svare_core.models.text_clip import CLIP_G, CLIP_L, load_clip_text
        rss_imports = _rss_with_transformers()
        t0 = time.time()
        # a tokenizer that ships in the repo (its ids fit CLIP's vocabulary): the weights are what is measured
        model, tok = load_clip_text(f[key], CLIP_L if key == "clip_l" else CLIP_G, dtype=DTYPES[dtype],
                                    tokenizer=FIXTURES / "switti_text_tiny" / "tokenizer_comfy", role=key)
        load_s = time.time() - t0
        rss_loaded = _rss_now()
        batch = tok(["a photo of a cat on a sofa"], padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            width = model(**batch).last_hidden_state.shape[-1]
        return {"seconds": load_s, "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype),
                "width": width, "file_bytes": f[key].stat().st_size, "rss_after_load_bytes": rss_loaded,
                "rss_with_transformers_bytes": rss_imports,
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    return job


def _switti_text(f):
    from svare_core.models.text_clip import SwittiText
    tok = FIXTURES / "switti_text_tiny" / "tokenizer_comfy"
    rss_imports = _rss_with_transformers()
    t0 = time.time()
    text = SwittiText(f["clip_l"], f["clip_g"], tokenizer_l=tok, tokenizer_g=tok)   # bf16, as Switti runs them
    load_s = time.time() - t0
    t1 = time.time()
    cond = text.encode(["a photo of a cat on a sofa", ""])
    return {"seconds": load_s, "encode_seconds": time.time() - t1, "features": list(cond.features.shape),
            "pooled": list(cond.pooled.shape), "finite": bool(torch.isfinite(cond.features).all()),
            "rss_with_transformers_bytes": rss_imports,
            "weight_bytes": sum(p.numel() * p.element_size() for p in text.model.parameters())}


def _sample(preset: str, device: str):
    def job(f):
        from svare_core import SamplerSettings, generate
        from svare_core.schedules import infinity_schedule
        t0 = time.time()
        pipe = _pipeline(f, "bf16", device=device)
        load_s = time.time() - t0
        scales = infinity_schedule("1:1", preset)
        settings = SamplerSettings(cfg=4.0, tau=0.5, top_p=0.97)
        if device == "cuda":   # warm-up at the smallest preset, then measure
            generate(pipe, ["warm up"], seed=1, settings=settings, scales=infinity_schedule("1:1", "0.06M"))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.time()
        res = generate(pipe, ["a photo of a cat on a sofa"], seed=0, settings=settings, scales=scales)
        if device == "cuda":
            torch.cuda.synchronize()
        out = {"load_seconds": load_s, "seconds_per_image": time.time() - t1, "image": list(res.images.shape),
               "finite": bool(torch.isfinite(res.images).all())}
        if device == "cuda":
            out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        return out
    return job


# Robust S-VARE at real size: every step an attack (2 Adam steps) and 4 near words screened, so that the
# peak memory of each part (the attack's backward through the transformer and the text encoder, the screen)
# shows within a few steps; the default budget (20 steps every 25, 48 words) costs time, not more memory.
ROBUST_PROBE = {"robust": True, "adversarial_every": 1, "adversarial_steps": 2, "adversarial_words": 4}


def _erase(preset: str, device: str, steps: int = 2, robust: bool = False):
    def job(f):
        from svare_core.erasure import PromptPair, erase
        from svare_core.settings import resolve_erase
        from svare_core.schedules import infinity_schedule
        t0 = time.time()
        pipe = _pipeline(f, "bf16", device=device)
        load_s = time.time() - t0
        cfg = resolve_erase(pipe, 1, steps=steps, **(ROBUST_PROBE if robust else {}))
        pairs = [PromptPair("a painting in the style of Van Gogh", "a painting", "van gogh"),
                 PromptPair("a starry night by Van Gogh", "a starry night", "van gogh")]
        stamps = []
        t1 = time.time()
        res = erase(pipe, pairs, cfg, preserve_prompts=["a photo of a dog"], scales=infinity_schedule("1:1", preset),
                    callback=lambda s: stamps.append(time.time()))
        out = {"load_seconds": load_s, "erase_seconds": time.time() - t1,
               "first_step_at": stamps[0] - t1 if stamps else None,
               "seconds_per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None,
               "trainable": cfg.trainable, "lora_rank": cfg.lora_rank, "steps": steps, "robust": cfg.robust,
               "patch_values": res.patch.num_values(),
               "losses": res.history[-1]}
        if device == "cuda":
            out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        return out
    return job


class _RandomClipText:
    """Stands in for Switti's two CLIP encoders: random (B, 77, 2048) features, a full mask and
    (B, 1280) pooled vectors; the same prompt gives the same features."""
    width = 2048

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)))
            out.append((torch.randn(77, 2048, generator=g), torch.ones(77, dtype=torch.bool), torch.randn(1280, generator=g)))
        return tuple(torch.stack(t) for t in zip(*out))


def _switti_sample(resolution: int, device: str):
    def job(f):
        from svare_core import generate
        from svare_core.loader import load_switti
        from svare_core.pipeline import VARPipeline
        from svare_core.schedules import SWITTI_RESOLUTIONS, switti_schedule
        from svare_core.settings import resolve_sampler
        t0 = time.time()
        transformer, vae = load_switti(f["switti_1024"], f["vqvae_switti"], dtype="bf16", device=device,
                                       vae_device="cpu" if device == "cpu" else device)
        load_s = time.time() - t0
        pipe = VARPipeline(transformer, vae, _RandomClipText(), name="switti_1024_random", family="switti")
        # Switti-512 has Switti-1024's width and depth: the 1024 model's weights on the 512 px
        # schedule do a 512 px sample's work (their images mean nothing: random weights).
        scales = switti_schedule(SWITTI_RESOLUTIONS[resolution])
        settings = resolve_sampler("switti")
        steps = []
        t1 = time.time()
        res = generate(pipe, ["a photo of a cat on a sofa"], seed=0, settings=settings, scales=scales,
                       callback=lambda s: steps.append(time.time()))
        if device == "cuda":
            torch.cuda.synchronize()
        out = {"load_seconds": load_s, "seconds_per_image": time.time() - t1, "image": list(res.images.shape),
               "finite": bool(torch.isfinite(res.images).all()), "scales": len(scales),
               "tokens": sum(h * w for h, w in scales), "transformer_seconds": steps[-1] - t1,
               "weight_bytes": sum(v.numel() * v.element_size() for v in transformer.state_dict().values()),
               "causal": transformer.cfg.causal}
        if device == "cuda":
            out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        return out
    return job


def _patch(f):
    """A rank-4 LoRA patch on every attention projection of the 2B (the Infinity default): saved, loaded,
    applied, stacked with a second one and removed again, in bf16 on the CPU."""
    from svare_core.erasure import ErasurePatch, apply_patch, remove_patch
    from svare_core.erasure.trainable import LORA_TARGETS
    pipe = _pipeline(f, "bf16")
    loaded_rss = _rss_now()
    shapes = {k: v.shape for k, v in pipe.transformer.state_dict().items()
              if k.startswith("block_chunks.") and k.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS["attn"]))}

    def lora(seed):
        g = torch.Generator().manual_seed(seed)
        t = {}
        for k, (o, i) in shapes.items():
            t[k + ".lora_A"] = torch.randn(4, i, generator=g) * 0.01
            t[k + ".lora_B"] = torch.randn(o, 4, generator=g) * 0.01
        return ErasurePatch(t, {"concepts": [f"c{seed}"], "base_fingerprint": pipe.base_fingerprint, "lora_scale": 1.0})

    t0 = time.time()
    path = lora(1).save(Path(f["2b"]).parent / "lora_attn_r4.safetensors")
    one = apply_patch(pipe, ErasurePatch.load(path))
    t_apply = time.time() - t0
    both = apply_patch(one, lora(2), 0.5)
    back = remove_patch(remove_patch(both, 0), 0)
    base = pipe.transformer.state_dict()
    exact = all(torch.equal(v, base[k]) for k, v in back.transformer.state_dict().items())
    return {"seconds": t_apply, "patch_file_bytes": path.stat().st_size, "patched_tensors": len(shapes),
            "patched_values": sum(math.prod(s) for s in shapes.values()),
            "rss_after_load_bytes": loaded_rss, "exact_removal": exact,
            "weight_bytes": sum(v.numel() * v.element_size() for v in base.values())}


def _switti_erase_state(f):
    """What erase() builds on Switti-1024 before its first step, with the family's recipe (bf16 weights,
    LoRA rank 4 on the attention, bf16 training): the student (sharing the frozen tensors), its LoRA
    factors and AdamW's state (one step on zero gradients makes the moments). Also the trainable counts of
    every set, on the meta device. No forward pass: that is the GPU's job (gpu_check.sh)."""
    from svare_core.erasure.trainable import DENSE_SETS, LORA_TARGETS, dense_parameters, lora_layers
    from svare_core.erasure.trainer import _student_copy, _trainable
    from svare_core.models import load_transformer
    from svare_core.models.switti import Switti
    from svare_core.settings import resolve_erase
    t0 = time.time()
    frozen = load_transformer(f["switti_1024"], dtype=torch.bfloat16)
    load_s, rss_loaded = time.time() - t0, _rss_now()
    cfg = resolve_erase("switti")
    t1 = time.time()
    student = _student_copy(frozen, cfg)
    base = frozen.state_dict()
    shared = sum(v.data_ptr() == base[k].data_ptr() for k, v in student.state_dict().items())
    params, _ = _trainable(student, cfg)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.research.betas)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    build_s = time.time() - t1
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if isinstance(t, torch.Tensor))
    with torch.device("meta"):
        meta = Switti(frozen.cfg)
    return {"seconds": build_s, "load_seconds": load_s, "rss_after_load_bytes": rss_loaded,
            "trainable": cfg.trainable, "lora_targets": cfg.lora_targets, "lora_rank": cfg.lora_rank,
            "precision": cfg.precision, "trainable_params": sum(p.numel() for p in params.values()),
            "lora_layers": len(lora_layers(meta, cfg.lora_targets)), "shared_tensors": int(shared),
            "tensors": len(base), "optimizer_state_bytes": state_bytes,
            "lora_params_rank4": {t: sum(4 * (m.in_features + m.out_features) for m in lora_layers(meta, t).values())
                                  for t in LORA_TARGETS},
            "dense_params": {n: sum(p.numel() for p in dense_parameters(meta, n).values()) for n in DENSE_SETS},
            "weight_bytes": sum(v.numel() * v.element_size() for v in base.values())}


def _inspect(key: str):
    def job(f):
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "svare_core", "inspect", str(f[key])], capture_output=True, text=True,
                           cwd=ROOT)
        return {"seconds": time.time() - t0, "rc": r.returncode, "output": (r.stdout + r.stderr).strip().splitlines()[:8]}
    return job


JOBS = {
    "inspect_2b": (_inspect("2b"), "cpu"),
    "inspect_8b": (_inspect("8b_fp32"), "cpu"),
    "load_2b_fp32": (_load("2b", "fp32"), "cpu"),
    "load_2b_bf16": (_load("2b", "bf16"), "cpu"),
    "load_8b_bf16_from_fp32": (_load("8b_fp32", "bf16"), "cpu"),
    "load_8b_bf16_from_bf16": (_load("8b_bf16", "bf16"), "cpu"),
    "load_8b_fp32": (_load("8b_fp32", "fp32"), "cpu"),      # 33.5 GB: refused up front on a 24 GB machine
    "text_bf16": (_text(None), "cpu"),
    "text_fp32": (_text("fp32"), "cpu"),
    "clip_l_bf16": (_clip_text("clip_l", "bf16"), "cpu"),
    "clip_l_fp32": (_clip_text("clip_l", "fp32"), "cpu"),
    "clip_g_bf16": (_clip_text("clip_g", "bf16"), "cpu"),
    "switti_text_bf16": (_switti_text, "cpu"),
    "patch_2b_bf16": (_patch, "cpu"),
    "sample_2b_256": (_sample("0.06M", "cpu"), "cpu"),
    "erase_2b_256": (_erase("0.06M", "cpu"), "cpu"),
    "erase_robust_2b_256": (_erase("0.06M", "cpu", robust=True), "cpu"),
    "inspect_switti_1024": (_inspect("switti_1024"), "cpu"),
    "load_switti_1024_bf16": (_load("switti_1024", "bf16"), "cpu"),
    "load_vqvae_switti_fp32": (_load_vae("vqvae_switti", "fp32"), "cpu"),
    "sample_switti_512_cpu": (_switti_sample(512, "cpu"), "cpu"),
    "erase_state_switti_1024_lora": (_switti_erase_state, "cpu"),
    "cuda_sample_switti_1024": (_switti_sample(1024, "cuda"), "cuda"),
    "cuda_sample_2b_1024": (_sample("1M", "cuda"), "cuda"),
    "cuda_erase_2b_512": (_erase("0.25M", "cuda", steps=3), "cuda"),
    "cuda_erase_2b_1024": (_erase("1M", "cuda", steps=3), "cuda"),
    "cuda_erase_robust_2b_1024": (_erase("1M", "cuda", steps=3, robust=True), "cuda"),
}


def run_child(job: str, out: Path) -> None:
    baseline = _rss_now()
    try:
        result = JOBS[job][0](files(out))
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - a refused or failed job is a result too
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result["rss_after_imports_bytes"] = baseline
    # VmHWM belongs to this process's own address space (new at exec), unlike wait4's ru_maxrss, which
    # a child inherits from a large parent.
    with open("/proc/self/status") as fh:
        result["peak_rss_bytes"] = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
    print("RESULT " + json.dumps(result), flush=True)


def run_job(job: str, out: Path, timeout: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--out", str(out), "--child", job], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    t0 = time.time()
    # A timer, not a check between lines: a job may print nothing until its result.
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        lines = list(proc.stdout)
    finally:
        timer.cancel()
    _, status, usage = os.wait4(proc.pid, 0)
    result = next((json.loads(ln[7:]) for ln in lines if ln.startswith("RESULT ")), None)
    if result is None:
        result = {"ok": False, "error": "no result (killed or crashed)", "tail": "".join(lines[-5:])[-800:]}
    result.setdefault("peak_rss_bytes", usage.ru_maxrss * 1024)   # a child that died reports none itself
    result.update(job=job, wall_seconds=time.time() - t0, exit_status=os.waitstatus_to_exitcode(status))
    return result


# -- the table -----------------------------------------------------------------------------------------------
def _gb(x) -> str:
    return f"{x / 1e9:.2f}" if isinstance(x, (int, float)) else "-"


def _s(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def table(results: list[dict]) -> str:
    rows = ["| job | ok | wall (s) | job time (s) | peak RSS (GB) | weights (GB) | peak VRAM (GB) | note |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.get("seconds", r.get("seconds_per_image", r.get("erase_seconds")))
        note = r.get("error", "")
        if "seconds_per_step" in r and r.get("seconds_per_step") is not None:
            note = f"{r['seconds_per_step']:.0f} s/step after {r['first_step_at']:.0f} s of targets; " \
                   f"{r['trainable']} rank {r['lora_rank']}"
        if "seconds_per_image" in r:
            note = f"image {r['image']}, load {r['load_seconds']:.0f} s, finite {r['finite']}"
            if "tokens" in r:
                note += f"; {r['scales']} scales, {r['tokens']} tokens, transformer+codes {r['transformer_seconds']:.0f} s"
        if r["job"].startswith("patch"):
            note = f"LoRA r4 on {r.get('patched_tensors')} tensors ({r.get('patched_values', 0) / 1e9:.2f}B values), " \
                   f"file {_gb(r.get('patch_file_bytes'))} GB, RSS after load {_gb(r.get('rss_after_load_bytes'))} GB, " \
                   f"exact removal {r.get('exact_removal')}"
        if r["job"].startswith("erase_state"):
            note = f"{r.get('trainable')} {r.get('lora_targets')} rank {r.get('lora_rank')}: " \
                   f"{r.get('trainable_params', 0) / 1e6:.2f}M trainable on {r.get('lora_layers')} layers; " \
                   f"{r.get('shared_tensors')}/{r.get('tensors')} tensors shared; RSS after load " \
                   f"{_gb(r.get('rss_after_load_bytes'))} GB"
        if r["job"].startswith("inspect"):
            note = next((ln.strip() for ln in r.get("output") or [] if "parameters" in ln), r.get("error", ""))
        if r["job"].startswith("load") and "fingerprint_seconds" in r:
            note = f"fingerprint {r['source_fingerprint']} ({r['fingerprint_seconds']:.2f} s to recompute)"
        if r["job"].startswith("clip"):
            note = f"fp16 file {_gb(r.get('file_bytes'))} GB -> {r.get('dtype')}; RSS with transformers imported " \
                   f"{_gb(r.get('rss_with_transformers_bytes'))} GB"
        if r["job"].startswith("switti_text"):
            note = f"clip_l + clip_g; features {r.get('features')}, pooled {r.get('pooled')}, 2 prompts encoded in " \
                   f"{_s(r.get('encode_seconds'))} s, finite {r.get('finite')}, RSS with transformers imported " \
                   f"{_gb(r.get('rss_with_transformers_bytes'))} GB"
        if r["job"].startswith("text"):
            note = f"{r.get('layers')} of 24 layers, {r.get('dtype')}; 24 layers: {r.get('params_24_layers', 0) / 1e9:.2f}B " \
                   f"parameters, {_gb(r.get('bytes_24_layers'))} GB"
        rows.append(f"| {r['job']} | {'yes' if r.get('ok') else 'no'} | {_s(r.get('wall_seconds'))} | {_s(t)} | "
                    f"{_gb(r.get('peak_rss_bytes'))} | {_gb(r.get('weight_bytes'))} | {_gb(r.get('peak_vram_bytes'))} | "
                    f"{note.replace('|', '/')[:140]} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for the real-size files (tens of GB)")
    p.add_argument("--write", action="store_true", help="write the files first (skips those that exist)")
    p.add_argument("--files", default="2b,vae_2b,t5,8b_fp32,8b_bf16,vae_8b,clip_l,clip_g", help="which files --write makes")
    p.add_argument("--jobs", default="all", help=f"comma-separated, or 'all': {', '.join(JOBS)}")
    p.add_argument("--json", type=Path, help="append results here (one object per job, keyed by job)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a job may take")
    p.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.table:
        print(table(list(json.loads(args.table.read_text())["jobs"].values())))
        return
    if args.out is None:
        p.error("--out is required")
    if args.child:
        run_child(args.child, args.out)
        return
    if args.write:
        write_all(args.out, args.files.split(","))
    jobs = list(JOBS) if args.jobs == "all" else args.jobs.split(",")
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown jobs {unknown}; choose from {list(JOBS)}")
    doc = json.loads(args.json.read_text()) if args.json and args.json.exists() else {"jobs": {}}
    for job in jobs:
        if JOBS[job][1] == "cuda" and not torch.cuda.is_available():
            print(f"{job}: skipped (no CUDA)", flush=True)
            continue
        r = run_job(job, args.out, args.timeout)
        print(f"{job}: {json.dumps(r)}", flush=True)
        doc["jobs"][job] = r
        doc["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1))
    if args.json:
        print(table(list(doc["jobs"].values())))


if __name__ == "__main__":
    main()
