"""Throughput of the svare_core.safety detectors: images per second per detector.

    HF_HUB_OFFLINE=1 python benchmarks/bench_safety.py [--batch 32] [--size 256]
        [--threads 2] [--repeats 3] [--clip-path /path/to/clip] [--device cpu]

Prints a markdown table. Inputs: a ComfyUI-style float tensor [B, H, W, 3] of
photos (scikit-image's CC0 sample photos, cropped/resized to --size; random
noise if scikit-image is not installed); the toy-world oracle gets 64 px
toy-world renders. Without --clip-path the CLIP row uses a tiny *random* CLIP
(2 layers, 32 px input) built in a temporary folder: a placeholder that only
measures the wrapper overhead, not a real CLIP (ViT-B/L are far slower).
Detectors whose optional package is missing are listed as unavailable.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from svare_core.safety import DetectorUnavailable, get_detector  # noqa: E402


def photo_batch(n: int, size: int) -> tuple[torch.Tensor, str]:
    try:
        import skimage.data as skd

        srcs = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
        what = "photos"
    except ImportError:
        rng = np.random.default_rng(0)
        srcs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]
        what = "noise"
    out = []
    for i in range(n):
        a = srcs[i % len(srcs)]
        h, w = a.shape[:2]
        s = min(h, w)
        y, x = (h - s) // 2, (w - s) // 2
        im = Image.fromarray(a[y : y + s, x : x + s]).resize((size, size), Image.BICUBIC)
        if i // len(srcs) % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(im))
    return torch.from_numpy(np.stack(out)).float() / 255.0, what


def toy_batch(n: int) -> torch.Tensor:
    from svare_core.toyworld import world as W

    imgs = np.stack([W.render(s) for s in W.make_scenes(n, seed=0)])
    return torch.from_numpy(imgs).float() / 255.0


def build_tiny_clip(path: Path) -> None:
    import string

    import transformers

    chars = [c for c in string.printable if c.isprintable() and not c.isspace()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(path)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)


def bench(name: str, images, concept, repeats: int, **options) -> dict:
    t0 = time.perf_counter()
    try:
        det = get_detector(name, **options)
    except DetectorUnavailable as exc:
        return {"error": str(exc).splitlines()[0]}
    load = time.perf_counter() - t0
    det.detect(images, concept=concept)  # warm-up (first-call allocations, text embeddings)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        det.detect(images, concept=concept)
        times.append(time.perf_counter() - t)
    best = min(times)
    n = images.shape[0]
    return {"load": load, "ips": n / best, "ms": 1000 * best / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op / torch threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clip-path", default=None, help="a real CLIP folder (default: tiny random placeholder)")
    ap.add_argument("--device", default="cpu", help="torch device for CLIP")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    photos, what = photo_batch(args.batch, args.size)
    rows = []
    px = f"{args.size} px {what}"
    rows.append(("nudenet", px, "nudity", bench("nudenet", photos, None, args.repeats, threads=args.threads)))
    rows.append(("open_nsfw", px, "nsfw", bench("open_nsfw", photos, None, args.repeats, threads=args.threads)))
    try:
        toys = toy_batch(args.batch)
        rows.append(("toyworld", "64 px toy renders", "red", bench("toyworld", toys, "red", args.repeats)))
    except ImportError as exc:
        rows.append(("toyworld", "64 px toy renders", "red", {"error": str(exc)}))
    with tempfile.TemporaryDirectory() as tmp:
        if args.clip_path:
            clip_path, clip_note = args.clip_path, Path(args.clip_path).name
        else:
            clip_path, clip_note = tmp, "tiny random CLIP (placeholder)"
            build_tiny_clip(Path(tmp))
        rows.append((f"clip: {clip_note}", px, "Van Gogh",
                     bench("clip", photos, "Van Gogh", args.repeats, model_path=clip_path, device=args.device)))

    cpu = platform.processor() or platform.machine()
    print(f"Batch of {args.batch} images, {args.threads} thread(s), device {args.device}, "
          f"best of {args.repeats} after a warm-up; {cpu}, torch {torch.__version__}.\n")
    print("| detector | input | concept | load (s) | images/s | ms/image |")
    print("|---|---|---|---:|---:|---:|")
    for name, inp, concept, r in rows:
        if "error" in r:
            print(f"| {name} | {inp} | {concept} | unavailable: {r['error']} | | |")
        else:
            print(f"| {name} | {inp} | {concept} | {r['load']:.2f} | {r['ips']:.1f} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
