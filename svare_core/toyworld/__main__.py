"""``python -m svare_core.toyworld train --out runs/toyworld``: train the embedded toy model."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .train import TrainSettings, train_all


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m svare_core.toyworld")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the toy VAE and transformer (resumable)")
    t.add_argument("--out", default="runs/toyworld", help="working folder (checkpoints, logs, dataset)")
    t.add_argument("--dest", default=None,
                   help="where to write the final model file (default: OUT/toyworld.safetensors)")
    for f in fields(TrainSettings):
        if f.type in ("int", "float"):
            t.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type == "int" else float, default=f.default)
    args = p.parse_args(argv)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)})
    print(train_all(args.out, settings, args.dest))


if __name__ == "__main__":
    main()
