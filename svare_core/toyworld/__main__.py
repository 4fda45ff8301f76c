"""``python -m svare_core.toyworld train --out runs/toyworld``: train the embedded toy model;
``train-vq --out runs/toyworld_vq``: the embedded VQ toy model (a Switti)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from . import train, train_vq

COMMANDS = {
    "train": (train, train.TrainSettings, "train the toy BSQ VAE and Infinity transformer (resumable)", "toyworld"),
    "train-vq": (train_vq, train_vq.VQTrainSettings, "train the toy VQ-VAE and Switti transformer (resumable)",
                 "toyworld_vq"),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m svare_core.toyworld")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (_, settings_cls, help_text, stem) in COMMANDS.items():
        t = sub.add_parser(name, help=help_text)
        t.add_argument("--out", default=f"runs/{stem}", help="working folder (checkpoints, logs, dataset)")
        t.add_argument("--dest", default=None, help=f"where to write the final model file (default: OUT/{stem}.safetensors)")
        for f in fields(settings_cls):
            if f.type in ("int", "float"):
                t.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type == "int" else float,
                               default=f.default)
    args = p.parse_args(argv)
    module, settings_cls, _, _ = COMMANDS[args.cmd]
    settings = settings_cls(**{f.name: getattr(args, f.name) for f in fields(settings_cls) if hasattr(args, f.name)})
    print(module.train_all(args.out, settings, args.dest))


if __name__ == "__main__":
    main()
