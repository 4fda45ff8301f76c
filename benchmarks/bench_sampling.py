"""Sampling speed and peak memory of svare's Infinity engine, optionally next to the reference code.

Not part of the test suite. Every measurement runs in a fresh Python subprocess, so peak memory is
per configuration: on the CPU the process's peak resident set (``resource.getrusage().ru_maxrss``, the
whole process) and how much it grew while sampling; on CUDA ``torch.cuda.max_memory_allocated`` during
sampling (weights included). Time per image = wall time of the sampling calls / images, after one
warm-up call; with ``--rounds R`` each implementation runs in R fresh processes (interleaved with the
reference's) and the fastest is reported, which keeps numbers usable on a busy machine. Sampling means
the whole text-to-image call: text conditioning (from given features), next-scale sampling with the KV
cache and CFG, and the VAE decode.

Configurations (random weights; text features are random tensors, so no text encoder is loaded):
  tiny    depth 2, C 64, 2 heads, 8-bit tokens, text width 128; the 0.06M 1:1 schedule (521 tokens);
          a tiny VAE (stride 2, 32x32 images). CPU, fp32.
  medium  depth 8, C 512, 8 heads, 32-bit tokens, text width 2048 (32 tokens); 0.06M 1:1; tiny VAE. CPU, fp32.
  2b      Infinity-2B-shaped (depth 32, C 2048) at 1024x1024 (the 1M preset, 13 scales) with the released
          2B VAE shape, bf16, CUDA only. The text encoder stays off the GPU (random features).

Usage:
  python benchmarks/bench_sampling.py                              # tiny, medium (+ 2b if CUDA is available)
  python benchmarks/bench_sampling.py --configs tiny,medium --threads 1 --repeats 3
  git show HEAD~1:svare_core/sampling.py > /tmp/old_sampling.py
  python benchmarks/bench_sampling.py --configs tiny,medium --threads 1 --ab /tmp/old_sampling.py

``--ab FILE`` compares two versions of the sampler (this checkout's svare_core/sampling.py and FILE, imported
into this checkout's package so both drive the same model object): in each worker process the two are called
in turn (ABBA...) ``--repeats`` times each after a warm-up, so machine load hits both alike; it prints the
median seconds per image of each, their ratio, and whether both drew the same bits.
  TORCHDYNAMO_DISABLE=1 PYTHONPATH=/path/to/stubs python benchmarks/bench_sampling.py \\
      --configs tiny,medium --reference /path/to/Infinity

``--reference PATH`` runs the reference implementation (a checkout of FoundationVision/Infinity; the
script imports ``infinity.models.infinity`` and ``infinity.models.bsq_vae.vae`` from PATH and nothing
else) on the same weights and the same text features, with the same settings (cfg 3 on logits, tau 1,
top-k/top-p off, KV cache), and prints ours/reference. The weights are written once per configuration
to a temporary folder and both implementations load them from there. Only the tiny and medium
configurations are run side by side.

The reference needs CUDA-only packages. On a CPU machine put a folder of stand-in modules first on
PYTHONPATH (they are not shipped here):
  flash_attn/__init__.py  ``flash_attn_func(q, k, v, dropout_p=0., softmax_scale=None, causal=False)`` on
                          (B, L, H, c) tensors and ``flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q,
                          cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0., softmax_scale=None,
                          causal=False)`` (packed rows, one softmax attention per sequence), written with
                          plain torch ops;
  timm/models/layers.py   ``DropPath`` (identity when not training or p = 0), ``drop_path``, ``trunc_normal_``;
  timm/models/__init__.py ``register_model`` (a decorator that returns its argument);
  timm/loss/__init__.py   ``SoftTargetCrossEntropy`` (any nn.Module; unused when sampling);
  pytz.py                 ``timezone(name)`` returning any tzinfo;
  torchvision/__init__.py + transforms.py   empty modules (imported, never used when sampling).
Also set TORCHDYNAMO_DISABLE=1 (the reference wraps a layer norm in torch.compile); the script sets it
for the reference subprocesses itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "tiny": dict(
        transformer=dict(depth=2, embed_dim=64, num_heads=2, text_dim=128, bits=8, ffn_dim=256, num_block_chunks=2,
                     text_max_len=64, pool_heads=1),
        vae=dict(ch=24, ch_mult=(2, 1), num_res_blocks=1, z_channels=8, norm_groups=32),
        ratio="1:1", preset="0.06M", text_len=16, dtype="fp32", device="cpu"),
    "medium": dict(
        transformer=dict(depth=8, embed_dim=512, num_heads=8, text_dim=2048, bits=32, ffn_dim=2048, num_block_chunks=4,
                     text_max_len=512, pool_heads=16),
        vae=dict(ch=24, ch_mult=(2, 1), num_res_blocks=1, z_channels=32, norm_groups=32),
        ratio="1:1", preset="0.06M", text_len=32, dtype="fp32", device="cpu"),
    "2b": dict(transformer="infinity_2b", vae="vae_d32", ratio="1:1", preset="1M", text_len=32, dtype="bf16",
               device="cuda"),
}
CFG, TAU = 3.0, 1.0


# -- shared helpers (workers) -----------------------------------------------------------------------------
def _configs(name: str):
    from svare_core.models.infinity import InfinityConfig, infinity_2b
    from svare_core.models.vae import VAEConfig, vae_d32
    spec = CONFIGS[name]
    t = infinity_2b() if spec["transformer"] == "infinity_2b" else InfinityConfig(**spec["transformer"])
    v = vae_d32() if spec["vae"] == "vae_d32" else VAEConfig(**spec["vae"])
    return t, v


def _text(name: str, batch: int):
    """Random text features (B, L, width) and the all-valid mask, the same in every worker."""
    import torch
    t, _ = _configs(name)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(batch, CONFIGS[name]["text_len"], t.text_dim, generator=g)
    return feats, torch.ones(batch, feats.shape[1], dtype=torch.bool)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def write_weights(name: str, folder: Path) -> dict[str, str]:
    """Random weights of a configuration: transformer (plain state dict, .safetensors) and VAE ({"vae": ...}, .pth)."""
    import torch
    from safetensors.torch import save_file
    from svare_core.models.infinity import Infinity
    from svare_core.models.vae import BSQVAE
    tcfg, vcfg = _configs(name)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    paths = {"transformer": str(folder / f"{name}_transformer.safetensors"), "vae": str(folder / f"{name}_vae.pth")}
    with torch.no_grad():
        model, vae = Infinity(tcfg), BSQVAE(vcfg)
        for p in list(model.parameters()) + list(vae.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths["transformer"])
    torch.save({"vae": {k: v.contiguous() for k, v in vae.state_dict().items()}}, paths["vae"])
    return paths


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(run, device: str, repeats: int, batch: int) -> dict:
    """Warm up once, then time ``repeats`` calls. Memory: the process's peak RSS, and how far it rose above the
    RSS the process had just before the first sampling call (the sampler's working memory)."""
    import torch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    run()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"s_per_image": dt / (repeats * batch), "peak_rss_mb": _maxrss_mb(),
           "sampling_rss_growth_mb": max(0.0, _maxrss_mb() - rss_before)}
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- workers --------------------------------------------------------------------------------------------------
class _FeatureText:
    """Stands in for the text encoder: prompt "i" -> row i of the given features (kept on the CPU)."""

    def __init__(self, feats, mask):
        self.feats, self.mask, self.width = feats, mask, feats.shape[-1]

    def encode(self, prompts):
        idx = [int(p) for p in prompts]
        return self.feats[idx], self.mask[idx]


def _our_pipeline(job: dict):
    """The pipeline, schedule and prompts of a configuration, as ``worker_ours`` samples them."""
    import torch
    from svare_core.models.infinity import Infinity
    from svare_core.models import load_transformer, load_vae
    from svare_core.models.vae import BSQVAE
    from svare_core.pipeline import VARPipeline
    from svare_core.schedules import infinity_schedule

    name, device, batch = job["config"], job["device"], job["batch"]
    spec = CONFIGS[name]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    if job.get("weights"):
        transformer = load_transformer(job["weights"]["transformer"], device=device, dtype=dtype)
        vae = load_vae(job["weights"]["vae"], device=device, token_bits=transformer.cfg.bits,
                       dtype=dtype if device != "cpu" else torch.float32)
    else:   # large configs: random weights made in place, straight in the target dtype
        tcfg, vcfg = _configs(name)
        torch.manual_seed(0)
        with torch.device(device):
            transformer = Infinity(tcfg).to(dtype).eval()
            vae = BSQVAE(vcfg).to(dtype).eval()
    feats, mask = _text(name, batch)
    pipe = VARPipeline(transformer, vae, _FeatureText(feats, mask), name=name, base_fingerprint="-")
    return pipe, infinity_schedule(spec["ratio"], spec["preset"]), [str(i) for i in range(batch)]


def worker_ours(job: dict) -> dict:
    from svare_core.sampling import SamplerSettings, generate

    device, batch = job["device"], job["batch"]
    pipe, scales, prompts = _our_pipeline(job)
    settings = SamplerSettings(cfg=CFG, tau=TAU)
    res = {}

    def run():
        res["out"] = generate(pipe, prompts, seed=0, settings=settings, scales=scales)

    out = _measure(run, device, job["repeats"], batch)
    out["image"] = list(res["out"].images.shape[1:3])
    out["tokens"] = sum(h * w for h, w in scales)
    return out


def _load_other_sampler(path: str):
    """Another version of svare_core/sampling.py, imported inside this checkout's package, so its relative
    imports (models, pipeline) are this checkout's and both samplers drive the same model object."""
    import importlib.util
    name = "svare_core._sampling_ab_other"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def worker_ab(job: dict) -> dict:
    """This checkout's ``generate`` against the one in ``job["ab"]``: calls alternate (ABBA...) in one
    process, so both see the same machine load; per-call seconds per image of each."""
    import torch
    import svare_core.sampling as this
    other = _load_other_sampler(job["ab"])
    pipe, scales, prompts = _our_pipeline(job)
    runs = {}
    for key, module in (("this", this), ("other", other)):
        settings = module.SamplerSettings(cfg=CFG, tau=TAU)
        runs[key] = (lambda m=module, st=settings: m.generate(pipe, prompts, seed=0, settings=st, scales=scales))
    first = {key: run() for key, run in runs.items()}         # warm-up, and the bits each draws
    same_bits = all(torch.equal(a, b) for a, b in zip(first["this"].bits, first["other"].bits))
    times = {"this": [], "other": []}
    for r in range(job["repeats"]):
        for key in (("this", "other") if r % 2 == 0 else ("other", "this")):
            _sync(job["device"])
            t0 = time.perf_counter()
            runs[key]()
            _sync(job["device"])
            times[key].append((time.perf_counter() - t0) / job["batch"])
    return {"this": times["this"], "other": times["other"], "same_bits": same_bits,
            "tokens": sum(h * w for h, w in scales)}


def worker_reference(job: dict) -> dict:
    import torch
    from safetensors.torch import load_file
    from svare_core.schedules import infinity_schedule

    sys.path.insert(0, job["reference"])
    import infinity.models.bsq_vae.vae as ref_vae          # noqa: E402 - the user's checkout
    import infinity.models.infinity as ref_inf             # noqa: E402

    name, device, batch = job["config"], job["device"], job["batch"]
    spec = CONFIGS[name]
    tcfg, vcfg = _configs(name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]

    # The reference VAE builder fixes base channels and res blocks; set ours through its args.
    orig_ae = ref_vae.AutoEncoder

    def autoencoder(args):
        args.base_ch, args.num_res_blocks = vcfg.ch, vcfg.num_res_blocks
        return orig_ae(args)

    ref_vae.AutoEncoder = autoencoder
    try:
        vae = ref_vae.vae_model(job["weights"]["vae"], "dynamic", vcfg.z_channels, 2 ** vcfg.z_channels, test_mode=True,
                                patch_size=vcfg.stride, encoder_ch_mult=list(vcfg.ch_mult),
                                decoder_ch_mult=list(vcfg.ch_mult))
    finally:
        ref_vae.AutoEncoder = orig_ae
    model = ref_inf.Infinity(
        vae_local=vae, text_channels=tcfg.text_dim, text_maxlen=tcfg.text_max_len, shared_aln=True,
        raw_scale_schedule=None, checkpointing=None, customized_flash_attn=False, fused_norm=True,
        pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
        rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=spec["preset"], apply_spatial_patchify=0,
        inference_mode=True, train_h_div_w_list=[1.0], depth=tcfg.depth, embed_dim=tcfg.embed_dim,
        num_heads=tcfg.num_heads, drop_path_rate=0.0, mlp_ratio=tcfg.ffn_dim / tcfg.embed_dim,
        block_chunks=tcfg.num_block_chunks, cond_drop_rate=0.0)
    missing, unexpected = model.load_state_dict(load_file(job["weights"]["transformer"]), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference model does not take these weights: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device=device, dtype=dtype).eval()
    vae = vae.to(device).eval()

    feats, mask = _text(name, batch)
    lens = mask.sum(1).tolist()
    kv = feats[mask].to(device)
    cu = torch.nn.functional.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)
    scales = [(1, h, w) for h, w in infinity_schedule(spec["ratio"], spec["preset"])]
    n = len(scales)
    res = {}

    def run():
        with torch.no_grad():
            res["out"] = model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=scales, label_B_or_BLT=(kv, lens, cu, max(lens)), B=batch, g_seed=0,
                cfg_list=[CFG] * n, tau_list=[TAU] * n, top_k=0, top_p=0.0, returns_vemb=1, cfg_insertion_layer=[0],
                vae_type=vcfg.z_channels, ret_img=True, inference_mode=True)

    out = _measure(run, device, job["repeats"], batch)
    out["image"] = list(res["out"][-1].shape[1:3])
    out["tokens"] = sum(h * w for _, h, w in scales)
    return out


# -- driver -------------------------------------------------------------------------------------------------------
def run_job(job: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def _best(runs: list[dict]) -> dict:
    """The fastest run (times on a shared machine only get slower from interference); an error if all failed."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = dict(min(ok, key=lambda r: r["s_per_image"]))
    best["all_s_per_image"] = [r["s_per_image"] for r in ok]
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None,
                    help="comma-separated: tiny,medium,2b (default: tiny,medium and 2b on CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--rounds", type=int, default=3,
                    help="fresh worker processes per implementation, interleaved with the reference's; the best "
                         "time is reported (robust on a busy machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in each worker (default: torch's)")
    ap.add_argument("--reference", default=None, help="path of a FoundationVision/Infinity checkout to compare with")
    ap.add_argument("--ab", default=None, metavar="SAMPLING_PY",
                    help="instead: time this checkout's sampler against another version of svare_core/sampling.py "
                         "(a file, e.g. from `git show REV:svare_core/sampling.py`) on the same model, alternating calls "
                         "in each worker process; prints the medians and their ratio")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        import torch
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        worker = {"reference": worker_reference, "ab": worker_ab}.get(job["impl"], worker_ours)
        out = worker(job)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    import torch
    cuda = torch.cuda.is_available()
    names = args.configs.split(",") if args.configs else ["tiny", "medium"] + (["2b"] if cuda else [])
    if args.ab:
        return main_ab(args, names, cuda)
    rows = []
    with tempfile.TemporaryDirectory(prefix="svare-bench-") as tmp:
        for name in names:
            spec = CONFIGS[name]
            device = spec["device"]
            if device == "cuda" and not cuda:
                print(f"skipping {name}: needs CUDA", file=sys.stderr)
                continue
            weights = write_weights(name, Path(tmp)) if name != "2b" else None
            job = dict(config=name, device=device, batch=args.batch, repeats=args.repeats, threads=args.threads,
                       weights=weights)
            ours_runs, ref_runs = [], []
            for _ in range(max(1, args.rounds)):
                ours_runs.append(run_job({**job, "impl": "ours"}))
                if args.reference and weights is not None:
                    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
                    ref_runs.append(run_job({**job, "impl": "reference",
                                             "reference": str(Path(args.reference).resolve())}, env))
                print(f"{name}: ours {ours_runs[-1]}" + (f"; reference {ref_runs[-1]}" if ref_runs else ""),
                      file=sys.stderr, flush=True)
            rows.append((name, device, spec["dtype"], _best(ours_runs), _best(ref_runs) if ref_runs else None))

    mem_key = "cuda_peak_mb"
    print(f"\nbatch {args.batch}, best of {args.rounds} processes x {args.repeats} timed calls after 1 warm-up, "
          f"cfg {CFG}, tau {TAU}, "
          f"threads {args.threads or torch.get_num_threads()}, torch {torch.__version__}\n")
    header = ("| config | device | dtype | tokens | image | ours s/img | ours peak mem (MB) | ours sampler mem (MB)")
    if args.reference:
        header += " | reference s/img | reference peak mem (MB) | reference sampler mem (MB) | ours / reference time"
    print(header + " |")
    print("|" + "---|" * header.count("|"))

    def mem_cells(r: dict) -> str:
        if mem_key in r:   # CUDA: peak allocated while sampling (weights included)
            return f"GPU {r[mem_key]:.0f} | RSS +{r['sampling_rss_growth_mb']:.0f}"
        return f"RSS {r['peak_rss_mb']:.0f} | +{r['sampling_rss_growth_mb']:.0f}"

    for name, device, dtype, ours, ref in rows:
        if "error" in ours:
            print(f"| {name} | {device} | {dtype} | error: {ours['error'][:200]} |")
            continue
        line = (f"| {name} | {device} | {dtype} | {ours['tokens']} | {ours['image'][0]}x{ours['image'][1]} | "
                f"{ours['s_per_image']:.4f} | {mem_cells(ours)}")
        if args.reference:
            if ref is None:
                line += " | n/a | n/a | n/a | n/a"
            elif "error" in ref:
                line += f" | error: {ref['error'][:200]} | | | "
            else:
                speedup = ours["s_per_image"] / ref["s_per_image"]
                line += f" | {ref['s_per_image']:.4f} | {mem_cells(ref)} | {speedup:.2f}"
        print(line + " |")
    return 0


def main_ab(args, names: list[str], cuda: bool) -> int:
    import statistics

    import torch
    rows = []
    with tempfile.TemporaryDirectory(prefix="svare-bench-") as tmp:
        for name in names:
            spec = CONFIGS[name]
            if spec["device"] == "cuda" and not cuda:
                print(f"skipping {name}: needs CUDA", file=sys.stderr)
                continue
            weights = write_weights(name, Path(tmp)) if name != "2b" else None
            job = dict(config=name, device=spec["device"], batch=args.batch, repeats=args.repeats,
                       threads=args.threads, weights=weights, impl="ab", ab=str(Path(args.ab).resolve()))
            runs = [run_job(job) for _ in range(max(1, args.rounds))]
            errors = [r["error"] for r in runs if "error" in r]
            ok = [r for r in runs if "error" not in r]
            for r in ok:
                print(f"{name}: median s/img this {statistics.median(r['this']):.4f}, "
                      f"other {statistics.median(r['other']):.4f}", file=sys.stderr, flush=True)
            rows.append((name, spec, ok, errors))
    print(f"\nbatch {args.batch}, {args.rounds} processes x {args.repeats} alternating timed calls of each sampler "
          f"after 1 warm-up each, cfg {CFG}, tau {TAU}, threads {args.threads or torch.get_num_threads()}, "
          f"torch {torch.__version__}; other = {args.ab}\n")
    print("| config | device | dtype | tokens | this s/img (median) | other s/img (median) | this / other (median) "
          "| this / other (min) | same bits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, spec, ok, errors in rows:
        if not ok:
            print(f"| {name} | {spec['device']} | {spec['dtype']} | error: {errors[0][:200]} |")
            continue
        this = [t for r in ok for t in r["this"]]
        other = [t for r in ok for t in r["other"]]
        a, b = statistics.median(this), statistics.median(other)
        print(f"| {name} | {spec['device']} | {spec['dtype']} | {ok[0]['tokens']} | {a:.4f} | {b:.4f} | {a / b:.3f} "
              f"| {min(this) / min(other):.3f} | {all(r['same_bits'] for r in ok)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
