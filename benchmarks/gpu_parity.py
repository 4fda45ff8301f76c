"""Reduced precision against the reference: teacher-forced logits of tests/fixtures/reference_tiny.

    python benchmarks/gpu_parity.py                       # fp32 CPU and bf16 on CUDA (bf16 CPU without one)
    python benchmarks/gpu_parity.py --json results.json   # add the numbers under "parity"

The reference Infinity code produced the goldens in fp32 on a CPU (see that folder's README). Each
run loads the same files with the normal loader at one device and precision and reports the largest
logit error against the goldens and the share of bit decisions (which class has the larger logit)
that agree with them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svare_core.models import load_transformer  # noqa: E402
from svare_core.models.text import pad_features  # noqa: E402
from svare_core.schedules import infinity_schedule  # noqa: E402

REF = ROOT / "tests" / "fixtures" / "reference_tiny"


@torch.no_grad()
def compare(device: str, dtype: torch.dtype) -> dict:
    goldens = load_file(str(REF / "goldens.safetensors"))
    model = load_transformer(REF / "infinity_tiny.pth", device=device, dtype=dtype)
    cu = goldens["text_cu_seqlens"].tolist()
    feats, mask = pad_features([goldens["text_features"][cu[i]:cu[i + 1]] for i in range(len(cu) - 1)])
    scales = infinity_schedule("1:1", "0.06M")
    cond = model.encode_text(feats.to(device, dtype), mask.to(device))
    logits = model(cond, goldens["tf_x_BLC_wo_prefix"].to(device, dtype), scales).float().cpu()
    ours = logits.reshape(*logits.shape[:2], -1)
    ref = goldens["tf_logits"]
    decide = lambda x: x.view(*x.shape[:2], -1, 2).argmax(-1)  # noqa: E731
    return {"device": device, "dtype": str(dtype).replace("torch.", ""),
            "max_abs_logit_error": float((ours - ref).abs().max()),
            "mean_abs_logit_error": float((ours - ref).abs().mean()),
            "logit_scale": float(ref.abs().mean()),
            "bit_decisions_agreeing": float((decide(ours) == decide(ref)).float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    runs = [("cpu", torch.float32)]
    runs += [("cuda", torch.bfloat16), ("cuda", torch.float32)] if torch.cuda.is_available() else [("cpu", torch.bfloat16)]
    results = [compare(d, t) for d, t in runs]
    for r in results:
        print(json.dumps(r))
    if args.json:
        doc = json.loads(args.json.read_text()) if args.json.exists() else {}
        doc["parity"] = results
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
