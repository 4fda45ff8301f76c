"""Command line: ``python -m svare_core {demo,sample,erase,evaluate,attack,cache,inspect} ...``

Exit status: 0 done; 2 a problem with the input (one line on stderr naming it and the fix;
nothing was written); 130 interrupted (Ctrl-C; nothing partial was written); 1 a bug (traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class UserError(SystemExit):
    """Exit status 2 with one line for the user (str() is that line)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _count(value: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _seed(value: str) -> int:
    """argparse type: a seed the samplers take."""
    from .sampling import MAX_SEED

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 <= n < MAX_SEED - 2**16:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED - 2**16}), got {n}")
    return n


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toyworld",
                   help="a bundled model ('toyworld', or 'toyworld_vq': a Switti), a svare file, or an Infinity or Switti checkpoint")
    p.add_argument("--vae", default=None, help="VAE file (Infinity and Switti checkpoints need one; Switti: VQVAE-Switti)")
    p.add_argument("--text-encoder", nargs="+", default=None, metavar="PATH",
                   help="text encoder folder (Infinity: google/flan-t5-xl); Switti: its clip_l and clip_g folders or "
                        "files, then a CLIP tokenizer folder for files (e.g. ComfyUI's comfy/sd1_tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the transformer; weights are cast as they stream in (Infinity: bf16)")
    p.add_argument("--vae-device", default=None, help="where the VAE runs (default: --device)")
    p.add_argument("--text-device", default="cpu", help="where the text encoder runs (cpu or cuda)")
    p.add_argument("--text-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="text encoder precision (default: bf16 for Flan-T5, fp32 for the toy model's)")
    p.add_argument("--text-offload", action="store_true",
                   help="keep the text encoder on the CPU and move it to --text-device only to encode")
    p.add_argument("--patch", action="append", default=[], help="erasure patch to apply (repeatable)")
    p.add_argument("--strength", type=float, action="append", default=[], help="strength per --patch (default 1)")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=_seed, default=0)


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist already")


# Training options of demo and erase (EraseConfig fields; preserve_cfg and adversarial_* research knobs, for
# the ablation benchmark); None keeps the model family's default.
ERASE_OPTIONS = (("method", str), ("steps", int), ("lr", float), ("trainable", str), ("lora_rank", int),
                 ("lora_targets", str), ("preservation_weight", float), ("preserve_per_step", int),
                 ("teacher_cfg", float), ("preserve_cfg", float), ("student_cfg", float), ("token_error_rate", float),
                 ("precision", str), ("aux_samples", int), ("aux_seeds", str), ("adversarial_every", int),
                 ("adversarial_steps", int))


ERASE_HELP = {"steps": "iterations in all (default: the model family's, times the number of concepts named)",
              "preserve_per_step": "preservation prompts in each preservation step, per concept",
              "precision": "fp32, or bf16: matmuls in bf16 (autocast) on CUDA and on CPUs with bf16 instructions",
              "aux_samples": "training images the frozen model draws per safe prompt",
              "aux_seeds": "per_prompt (each safe prompt its own seeds) or shared (the same seeds for all)",
              "adversarial_every": "with --robust: steps between refreshes of the soft-prompt attack",
              "adversarial_steps": "with --robust: the attack's Adam steps at each refresh"}


def _add_erase_args(p: argparse.ArgumentParser) -> None:
    for name, typ in ERASE_OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help=ERASE_HELP.get(name))
    p.add_argument("--robust", action="store_const", const=True, default=None,
                   help="S-VARE trains against soft-prompt attacks found during training (slower)")
    _add_cache_arg(p)
    p.add_argument("--no-cache", action="store_true",
                   help="compute the auxiliary tokens and teacher targets afresh and keep nothing")


def _add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="where auxiliary tokens and teacher targets are kept between runs "
                        "(default: $SVARE_CACHE_DIR or ~/.cache/svare/erasure)")


def _cache_dir(args) -> Path | None:
    from .erasure.cache import default_cache_dir

    if getattr(args, "no_cache", False):
        return None
    return Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else default_cache_dir()


def _load_base(args):
    from . import load_pipeline

    # one path (Infinity, the toy model) or a model's several text encoders (Switti: clip_l clip_g [tokenizer])
    text = args.text_encoder
    text = None if not text else text[0] if len(text) == 1 else tuple(text)
    return load_pipeline(args.model, vae=args.vae, text_encoder=text, device=args.device, dtype=args.dtype,
                         vae_device=args.vae_device, text_device=args.text_device, text_dtype=args.text_dtype,
                         text_offload=args.text_offload)


def _read_patches(args) -> list:
    """The --patch files, read and verified (before the model loads: a bad file fails in a second)."""
    from .erasure import ErasurePatch

    if len(args.strength) > len(args.patch):
        raise UserError(f"{len(args.strength)} --strength values for {len(args.patch)} --patch files")
    return [(ErasurePatch.load(path), args.strength[i] if i < len(args.strength) else 1.0)
            for i, path in enumerate(args.patch)]


def _with_patches(pipe, patches):
    from .erasure import apply_patch

    for patch, strength in patches:
        pipe = apply_patch(pipe, patch, strength)
    return pipe


def _load(args):
    patches = _read_patches(args)
    return _with_patches(_load_base(args), patches)


def _settings(args, pipe):
    from .settings import resolve_sampler

    return resolve_sampler(pipe, **{name: getattr(args, name, None) for name in ("cfg", "tau", "top_p", "top_k")},
                           negative_prompt=getattr(args, "negative_prompt", None) or None)


def cmd_sample(args) -> None:
    from . import generate
    from .outputs import check_folder, refuse_existing
    from .visual import save_png

    out = check_folder(args.out, "images")
    prompts = [p for p in args.prompt for _ in range(args.n)]
    targets = [out / f"{args.seed + i:05d}.png" for i in range(len(prompts))]
    refuse_existing(targets, args.overwrite)
    pipe = _load(args)
    if args.compile:
        from .kernels import compile_transformer

        compile_transformer(pipe.transformer)
    settings = _settings(args, pipe)
    settings.validate()
    written = 0
    with tqdm(total=len(prompts), desc="sampling", unit="img") as bar:
        for i in range(0, len(prompts), args.batch):
            chunk = prompts[i:i + args.batch]
            res = generate(pipe, chunk, seed=args.seed + i, settings=settings, aspect_ratio=args.aspect_ratio,
                           preset=args.preset)
            for j, img in enumerate(res.images):
                save_png(img, targets[i + j], {"prompt": chunk[j], "seed": str(args.seed + i + j)})
                written += 1
            bar.update(len(chunk))
    print(f"wrote {written} image{'s' if written != 1 else ''} to {out}")


PAIR_FILE_SUFFIXES = (".json", ".csv", ".txt")


def _pairs_from_args(args):
    from .erasure import build_pairs, load_pairs
    from .erasure.pairs import tag_pairs

    if args.pairs and Path(args.pairs).is_file():
        return tag_pairs(load_pairs(args.pairs), args.concept)
    if args.pairs and "=>" not in args.pairs and (Path(args.pairs).suffix in PAIR_FILE_SUFFIXES or "/" in args.pairs):
        raise UserError(f"{args.pairs}: no such pairs file (inline pairs are written 'unsafe prompt => safe prompt')")
    return build_pairs(args.concept, args.anchor, args.kind, (args.pairs or "").replace(";", "\n"))


def _erase_config(args, pipe, pairs=()):
    from .settings import resolve_erase

    cache = _cache_dir(args)
    names = (*(o for o, _ in ERASE_OPTIONS), "seed", "robust")
    return resolve_erase(pipe, pairs, **{name: getattr(args, name, None) for name in names},
                         cache_dir=None if cache is None else str(cache))


def _run_erase(pipe, pairs, cfg, preserve, desc="erasing"):
    """erase() with a progress bar showing the losses."""
    from .erasure import erase

    targets = tqdm(desc="training targets", unit="img", leave=False)

    def on_targets(done: int, total: int) -> None:
        targets.total = total
        targets.n = done
        targets.refresh()

    try:
        with tqdm(total=cfg.steps, desc=desc, unit="step") as bar:   # closed (its line ended) on errors too
            def on_step(s):
                targets.close()
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in s.losses.items()})

            return erase(pipe, pairs, cfg, preserve_prompts=preserve, callback=on_step, targets_callback=on_targets)
    finally:
        targets.close()


def cmd_erase(args) -> None:
    from .erasure.pairs import preserve_prompts_for
    from .outputs import check_file, write_or_rescue

    out = check_file(args.out, overwrite=args.overwrite, suffix=".safetensors", what="patch")
    pipe = _load(args)
    args.kind = args.kind or _family(pipe).pair_kind
    pairs = _pairs_from_args(args)
    cfg = _erase_config(args, pipe, pairs)
    cfg.validate()
    result = _run_erase(pipe, pairs, cfg, preserve_prompts_for(pairs, args.kind, args.preserve))
    result.patch.meta["metrics"]["train_seconds"] = round(result.seconds, 1)
    path = write_or_rescue(result.patch.save, out, "patch")
    print(f"erased {result.patch.concepts} with {cfg.method} in {result.seconds:.0f} s; patch: {path} "
          f"({path.stat().st_size / 1e6:.2f} MB)")
    _print_cache(cfg)


def _print_cache(cfg) -> None:
    from .erasure import cache

    if cfg.cache_dir is not None:
        print(f"{cache.describe(cfg.cache_dir)} (python -m svare_core cache --clear empties it)")


def cmd_cache(args) -> None:
    """Where the erasure cache is, how big; --clear empties it."""
    from .erasure import cache

    folder = _cache_dir(args)
    if args.clear:
        files, size = cache.clear(folder)
        print(f"removed {files} file{'s' if files != 1 else ''} ({size / 1e6:.2f} MB) from {folder}")
    else:
        print(cache.describe(folder))


def _family(pipe):
    from .settings import family_of
    return family_of(pipe)


def cmd_evaluate(args) -> None:
    from . import plugins
    from .erasure.evaluate import evaluate_with_detector
    from .erasure.pairs import template_prompts
    from .outputs import check_file, write_or_rescue

    report_path = check_file(args.json, overwrite=args.overwrite, suffix=".json", what="report") if args.json else None
    patches = _read_patches(args)
    concepts = args.concept or sorted({c for p, _ in patches for c in p.concepts})
    if not concepts:
        raise UserError("name the erased concepts with --concept, or give --patch files that record them")
    base = _load_base(args)                  # loaded once: the erased model shares its untouched weights
    erased = _with_patches(base, patches)
    settings = _settings(args, base)
    settings.validate()
    detector = args.detector or _family(base).evaluation
    evaluation = plugins.get("evaluation", detector) if detector else None
    if evaluation is not None:
        report = evaluation(base, erased, concepts, seeds=args.seeds, settings=settings)
    elif detector is None:
        raise UserError("for a real model choose the judge: --detector nudenet (nudity) or clip (objects, styles; "
                        "with --clip-model FOLDER)")
    else:
        options = {"model_path": args.clip_model} if args.clip_model else {}
        report = {"concepts": {}}
        for c in concepts:
            report["concepts"][c] = evaluate_with_detector(base, erased, c, template_prompts(c, args.kind), detector=detector,
                                                           threshold=args.threshold, seeds=args.seeds,
                                                           settings=settings, detector_options=options)
    text = json.dumps(report, indent=1)
    if report_path is not None:
        write_or_rescue(lambda path: _write_text(path, text), report_path, "report")
    print(text)


def _attack_prompts(args, patches, concept: str) -> list[str]:
    """--prompt, else the erased pairs' prompts that name the concept, else the --kind templates."""
    from .erasure.pairs import mentions, template_prompts

    if args.prompt:
        return args.prompt
    recorded = [u for p, _ in patches for u, _ in p.meta.get("pairs", []) if mentions(u, concept)]
    return recorded or template_prompts(concept, args.kind or "object")


def cmd_attack(args) -> None:
    from dataclasses import fields

    from .erasure.attacks import ATTACKS, AttackBudget, Judge, run_attacks
    from .outputs import check_file, write_or_rescue

    report_path = check_file(args.json, overwrite=args.overwrite, suffix=".json", what="report") if args.json else None
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip()) if args.attacks else ATTACKS
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise UserError(f"unknown attack(s) {unknown}; --attacks takes a comma list of {', '.join(ATTACKS)}")
    patches = _read_patches(args)
    if not patches:
        raise UserError("give the erased model's --patch (the attacks compare it with the base model)")
    concepts = args.concept or sorted({c for p, _ in patches for c in p.concepts})
    if not concepts:
        raise UserError("name the erased concept with --concept (the patch records none)")
    names = {f.name for f in fields(AttackBudget)}
    budget = AttackBudget(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    base = _load_base(args)
    erased = _with_patches(base, patches)
    settings = _settings(args, base)
    settings.validate()
    detector = args.detector or _family(base).evaluation
    if detector is None:
        raise UserError("for a real model choose the judge: --detector nudenet (nudity) or clip (objects, styles; "
                        "with --clip-model FOLDER)")
    options = {"model_path": args.clip_model} if args.clip_model else {}
    report = {"concepts": {}}
    for c in concepts:
        judge = Judge(detector, c, args.threshold, options)
        report["concepts"][c] = run_attacks(base, erased, c, _attack_prompts(args, patches, c), judge, budget=budget,
                                            settings=settings, attacks=attacks, seed=args.seed)
    text = json.dumps(report, indent=1)
    if report_path is not None:
        write_or_rescue(lambda path: _write_text(path, text), report_path, "report")
    print(text)


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (a temporary file in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cmd_inspect(args) -> None:
    from .models import ModelLoadError, inspect_file

    try:
        print(inspect_file(args.path).summary())
    except ModelLoadError as e:
        print(f"cannot use {args.path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_demo(args) -> None:
    """The main job: erase a concept from the toy model, write a before/after grid and the report."""
    from .outputs import check_folder, refuse_existing
    from .toyworld.demo import output_files, run_demo

    started = time.time()
    out = check_folder(args.out, "demo results")
    refuse_existing(output_files(out, args.concept), args.overwrite)
    base = _load(args)
    cfg = _erase_config(args, base)
    print(run_demo(base, cfg, _settings(args, base), _run_erase, concept=args.concept,
                   anchor=args.anchor, out=args.out, preserve=args.preserve, seeds=args.seeds,
                   grid_seeds=args.grid_seeds, seed=args.seed, started=started, attack_steps=args.attack_steps))
    _print_cache(cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m svare_core", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="erase a concept from the toy model; write a before/after grid and a report")
    _add_model_args(d)
    _add_sampler_args(d)
    d.add_argument("--concept", default="red")
    d.add_argument("--anchor", default="blue")
    d.add_argument("--preserve", action="append", default=[])
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--seeds", type=_count, default=4, help="samples per prompt in the report")
    d.add_argument("--grid-seeds", type=_count, default=3)
    d.add_argument("--attack-steps", type=_count, default=60, help="steps of the soft-prompt attack in the grid's last row")
    _add_overwrite_arg(d)
    _add_erase_args(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="generate PNGs")
    _add_model_args(s)
    _add_sampler_args(s)
    s.add_argument("--prompt", action="append", required=True, help="repeatable")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--n", type=_count, default=1, help="images per prompt")
    s.add_argument("--batch", type=_count, default=8)
    s.add_argument("--aspect-ratio", default="1:1")
    s.add_argument("--preset", default="1M", help="Infinity resolution preset (0.06M, 0.25M, 0.60M, 1M)")
    s.add_argument("--out", default="outputs/samples", help="folder for the PNGs (named by seed)")
    s.add_argument("--compile", action="store_true",
                   help="run the transformer's blocks through torch.compile (pays on CUDA for many images; "
                        "falls back to eager blocks, with a warning, where compiling fails)")
    _add_overwrite_arg(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("erase", help="train an erasure patch")
    _add_model_args(e)
    e.add_argument("--concept", action="append", default=[], help="repeatable: several concepts in one run")
    e.add_argument("--anchor", action="append", default=[], help="one per --concept")
    e.add_argument("--kind", default=None, help="object, style, nudity, or toy (default: the model family's)")
    e.add_argument("--pairs", default=None, help="a .json/.csv/.txt file of pairs, or 'unsafe => safe; ...'")
    e.add_argument("--preserve", action="append", default=[], help="preservation prompt (repeatable)")
    e.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    e.add_argument("--seed", type=_seed, default=None)
    _add_overwrite_arg(e)
    _add_erase_args(e)
    e.set_defaults(func=cmd_erase)

    v = sub.add_parser("evaluate", help="erasure report on the toy world (oracle-judged)")
    _add_model_args(v)
    _add_sampler_args(v)
    v.add_argument("--concept", action="append", default=[])
    v.add_argument("--seeds", type=_count, default=4)
    v.add_argument("--json", default=None, help="write the report here (.json)")
    _add_overwrite_arg(v)
    v.add_argument("--detector", default=None,
                   help="judge: nudenet, clip, open_nsfw, or toyworld (the default for the toy model: its oracle)")
    v.add_argument("--kind", default="object", help="templates for the concept prompts of real models: object, style, nudity")
    v.add_argument("--threshold", type=float, default=0.5, help="detector score that counts as 'concept present'")
    v.add_argument("--clip-model", default=None, help="local CLIP folder for --detector clip")
    v.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("attack", help="try to prompt an erased concept back; success rates on the erased and base models")
    _add_model_args(a)
    _add_sampler_args(a)
    a.set_defaults(seed=5000)
    a.add_argument("--concept", action="append", default=[], help="default: the concepts the patches record")
    a.add_argument("--prompt", action="append", default=[],
                   help="attack prompt naming the concept (repeatable; default: the patch's training prompts)")
    a.add_argument("--attacks", default=None, help="comma list of near_words, token_search, soft_prompt, "
                   "concept_direction (default: all)")
    a.add_argument("--detector", default=None, help="judge: nudenet, clip, or toyworld (the toy model's default)")
    a.add_argument("--threshold", type=float, default=0.5, help="detector score that counts as 'concept shown'")
    a.add_argument("--clip-model", default=None, help="local CLIP folder for --detector clip")
    a.add_argument("--kind", default=None, help="templates for the prompts when the patch records none")
    a.add_argument("--json", default=None, help="write the report here (.json)")
    for name in ("near_words", "word_pool", "search_slots", "soft_tokens", "soft_steps", "target_images", "judge_seeds",
                 "max_prompts"):
        a.add_argument(f"--{name.replace('_', '-')}", type=_count, default=None, help="attack budget (see AttackBudget)")
    a.add_argument("--soft-lr", type=float, default=None, help="soft-prompt step, in units of the embeddings' spread")
    _add_overwrite_arg(a)
    a.set_defaults(func=cmd_attack)

    c = sub.add_parser("cache", help="where the erasure cache (auxiliary tokens, teacher targets) is and its size")
    _add_cache_arg(c)
    c.add_argument("--clear", action="store_true", help="remove its entries")
    c.set_defaults(func=cmd_cache)

    i = sub.add_parser("inspect", help="what a model file is, or why it cannot be used")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    args = p.parse_args(argv)
    from .safety.base import DetectorUnavailable

    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        # Every file is written atomically: an interrupted run leaves no partial file.
        print("interrupted: nothing partial was written", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, ArithmeticError, DetectorUnavailable, KeyError) as e:
        # Input the program cannot use (ModelLoadError, PatchError, OutputError are ValueErrors), a file
        # it cannot read or write, a diverged training: one clear line, no traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        error = UserError(str(message) if not isinstance(e, OSError) or not e.filename else
                          f"{e.filename}: {e.strerror or e}")
        print(f"error: {error}", file=sys.stderr)
        raise error from None


if __name__ == "__main__":
    main()
