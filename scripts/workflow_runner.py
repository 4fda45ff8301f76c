"""Run the pack's example workflows (UI-format files in example_workflows/) without ComfyUI, on the toy
model, and check what each one's Note says it shows.

    python scripts/workflow_runner.py                       # every workflow: oracle readings + the Note's claims
    python scripts/workflow_runner.py --threads 2 "Safety check"
    python scripts/workflow_runner.py --train                # retrain Erase Concept nodes (minutes each)
    python scripts/workflow_runner.py --train --save-patches # ... and store them as the test fixtures

A workflow runs as ComfyUI runs it: its nodes in link order, each through INPUT_TYPES + FUNCTION under
``torch.inference_mode()``, with the widget values and seeds stored in the file.

Erase Concept trains for minutes on a CPU, so by default its patch is a stored one: the patch that
node trained, kept in ``tests/fixtures/workflow_patches/<workflow>.<node id>.safetensors``, or, when
the workflow saves it under the name of a patch shipped with the pack (Save Erasure Patch's prefix),
that patch (``--train --save-patches`` writes them). Before the stored patch stands in, the run
checks that the node would train it from exactly the same inputs (pairs, preservation prompts, every
hyperparameter, the base model); only a change of the training code itself goes unnoticed, which
``--train`` (and the test run with SVARE_SLOW_TESTS=1) checks by comparing checksums. Each run
starts as a freshly started ComfyUI would (see forget_text_features).

The claims: a Note line "What it shows" followed by lines
    - row N: <reading before> -> <reading after>     Compare's row N (before / after column); "unchanged"
    - image N: <at strength 0> -> <as set>           the VAR Sampler's image N without / with the patch
    - image N: <reading>, flagged | not flagged      the VAR Sampler's image N and Safety Score's flag
A reading is what the toy world's oracle sees, written as a prompt: "a solid blue circle on a black
background" (``nothing on a gray background`` when nothing is drawn).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "example_workflows"
PATCH_DIR = ROOT / "tests" / "fixtures" / "workflow_patches"
BUNDLED_PATCH_DIR = ROOT / "svare_core" / "toyworld" / "patches"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
VIRTUAL = ("Note", "MarkdownNote")
OUTPUT_NODES = ("SaveImage", "PreviewImage", "PreviewAny")
CLAIMS_HEADER = "What it shows"
_ROW = re.compile(r"^- (row|image) (\d+): (.+?) -> (.+?)\.?$")
_FLAG = re.compile(r"^- image (\d+): (.+), (flagged|not flagged)\.?$")


def pack():
    """The repository imported as the ComfyUI pack (as ComfyUI does: a package from a folder)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _pack import load_pack

    return load_pack()


def workflows() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def slug(path: Path | str) -> str:
    """'Multi-concept erasure' -> 'multi_concept_erasure' (fixture and screenshot names)."""
    return re.sub(r"[^a-z0-9]+", "_", Path(path).stem.lower()).strip("_")


def patch_fixture(path: Path | str, node_id: int) -> Path:
    """Where the patch Erase Concept #node_id trains is stored: the pack's own example patch when the
    workflow saves it under that name (Save Erasure Patch's prefix), else a test fixture."""
    wf = load(path)
    saves = {link[3] for link in wf["links"] if link[1] == node_id and link[2] == 0}
    for n in wf["nodes"]:
        if n["id"] in saves and n["type"] == "SvareSaveErasurePatch":
            shipped = BUNDLED_PATCH_DIR / f"{n['widgets_values'][0]}.safetensors"
            if shipped.is_file():
                return shipped
    return PATCH_DIR / f"{slug(path)}.{node_id}.safetensors"


def load(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def note(wf: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in VIRTUAL)


# -- claims ---------------------------------------------------------------------------------------
@dataclass
class Claim:
    kind: str                      # "row" | "image" | "flag"
    index: int                     # 1-based
    before: str | None = None      # the reading (row, image) before / at strength 0
    after: str | None = None       # the reading after / at the workflow's strength; for "flag": the image's
    flagged: bool | None = None
    line: str = ""


def claims(wf: dict) -> list[Claim]:
    """The claim lines of the workflow's Note (after the line starting with "What it shows")."""
    lines = note(wf).splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(CLAIMS_HEADER)), None)
    if start is None:
        return []
    out = []
    for ln in lines[start + 1:]:
        ln = ln.strip()
        if not ln.startswith("- "):
            break
        if m := _FLAG.match(ln):
            out.append(Claim("flag", int(m[1]), after=m[2], flagged=m[3] == "flagged", line=ln))
        elif m := _ROW.match(ln):
            before, after = m[3], m[4]
            out.append(Claim(m[1], int(m[2]), before, before if after == "unchanged" else after, line=ln))
        else:
            raise ValueError(f"cannot read the claim {ln!r}: write '- row N: A -> B', '- image N: A -> B' or "
                             "'- image N: A, flagged'")
    return out


def caption(reading: dict) -> str:
    """An oracle reading as a prompt: 'a striped blue heart on a gray background'."""
    from svare_core.toyworld import world

    if "none" in (reading["shape"], reading["colour"], reading["style"]):
        return f"nothing on a {reading['background']} background"
    return world.full_caption(reading["shape"], reading["colour"], reading["style"], reading["background"])


def captions(images) -> list[str]:
    from svare_core.toyworld.oracle import Oracle

    return [caption(r) for r in Oracle().read(images)]


# -- running a graph --------------------------------------------------------------------------------
@dataclass
class Run:
    """What a workflow run produced: each node's result, the images every generate() call of a node drew
    (Compare draws twice: before, after), and the patches Erase Concept nodes returned."""
    results: dict[int, tuple] = field(default_factory=dict)
    drawn: dict[int, list] = field(default_factory=dict)
    bits: dict[int, list] = field(default_factory=dict)          # the sampled bits of each generate() call
    shown: dict[int, object] = field(default_factory=dict)      # SaveImage / PreviewImage / PreviewAny inputs
    seconds: float = 0.0


def widget_names(cls) -> list[str]:
    """The node's widget inputs in widget order (a seed is followed by its control_after_generate value)."""
    spec = cls.INPUT_TYPES()
    names = []
    for name, (t, *_) in {**spec["required"], **spec.get("optional", {})}.items():
        if isinstance(t, list) or t in WIDGET_TYPES:
            names.append(name)
            if name == "seed":
                names.append(None)
    return names


def node_inputs(node: dict, cls, upstream: dict[int, tuple], links: dict[int, list]) -> dict:
    kwargs = {}
    for inp in node.get("inputs", []):
        if inp.get("link") is not None:
            _, src, slot, *_ = links[inp["link"]]
            kwargs[inp["name"]] = upstream[src][slot]
    for name, value in zip(widget_names(cls), node.get("widgets_values", [])):
        if name is not None and name not in kwargs:
            kwargs[name] = value
    return kwargs


def order(wf: dict) -> list[dict]:
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in VIRTUAL}
    deps = {i: {link[1] for link in wf["links"] if link[3] == i} for i in nodes}
    done, out = set(), []
    while len(out) < len(nodes):
        ready = sorted(i for i in nodes if i not in done and deps[i] <= done)
        if not ready:
            raise ValueError("the workflow's links form a cycle")
        for i in ready:
            done.add(i)
            out.append(nodes[i])
    return out


class StoredPatchMismatch(AssertionError):
    pass


@contextlib.contextmanager
def stored_erasure(p, path: Path, node_id: int, enabled: bool):
    """While active, Erase Concept returns the stored patch for ``node_id`` instead of training, after
    checking that it would have trained it from the same inputs."""
    if not enabled:
        yield
        return
    from svare_core.erasure import ErasurePatch
    from svare_core.erasure.methods import method_for
    from svare_core.erasure.pairs import validate_pairs
    from svare_core.erasure.trainer import ErasureResult

    module = p.nodes.erasure
    real = module.erase
    fixture = patch_fixture(path, node_id)

    def erase(pipe, pairs, config, *, preserve_prompts=None, callback=None, **kw):
        if not fixture.is_file():
            raise StoredPatchMismatch(f"{fixture} is missing: run python scripts/workflow_runner.py --train "
                                      f"--save-patches {Path(path).stem!r}")
        patch = ErasurePatch.load(fixture)
        pairs = validate_pairs(list(pairs))
        expected = {
            "base_fingerprint": pipe.base_fingerprint,
            "pairs": [[q.unsafe, q.safe] for q in pairs][:200],
            "preserve_prompts": method_for(config.method).preserve_prompts(config, preserve_prompts or [])[:200],
            "hyperparameters": json.loads(json.dumps(config.used_options())),
            "steps": config.steps,
        }
        stored = {k: json.loads(json.dumps(patch.meta.get(k))) for k in expected}
        # Settings this run does not use (robust knobs of a default erasure) may differ: they cannot change it.
        stored["hyperparameters"] = {k: (stored["hyperparameters"] or {}).get(k) for k in expected["hyperparameters"]}
        diff = sorted(k for k in expected if stored[k] != expected[k])
        if diff:
            raise StoredPatchMismatch(
                f"{fixture.name} was trained with other {', '.join(diff)} than node {node_id} of {Path(path).name} "
                f"uses now: run python scripts/workflow_runner.py --train --save-patches {Path(path).stem!r}")
        return ErasureResult(patch=patch, history=[], seconds=0.0)

    module.erase = erase
    try:
        yield
    finally:
        module.erase = real


@contextlib.contextmanager
def recording(p, run: Run, node_id: list):
    """Record the images of every generate() call the sampling nodes make, under the current node id."""
    modules = (p.nodes.compare, p.nodes.sampler)
    reals = [m.generate for m in modules]

    def wrap(real):
        def generate(*args, **kwargs):
            result = real(*args, **kwargs)
            run.drawn.setdefault(node_id[0], []).append(result.images)
            # the drawn tokens: bits of a bitwise model, code indices of a VQ model (Switti)
            run.bits.setdefault(node_id[0], []).append(result.bits if hasattr(result, "bits") else result.indices)
            return result
        return generate

    for m, real in zip(modules, reals):
        m.generate = wrap(real)
    try:
        yield
    finally:
        for m, real in zip(modules, reals):
            m.generate = real


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def forget_text_features(pipe) -> None:
    """Empty the text encoder's per-prompt feature cache of a pipeline Load VAR returned (it returns the
    same cached pipeline every time), so a run does what it does in a freshly started ComfyUI. (Features no
    longer depend on the other prompts of a batch, see TextEncoder._encode_uncached; this keeps each run's
    encoding work, and its time, that of a fresh start.)"""
    encoder = getattr(pipe, "text_encoder", None)
    if hasattr(encoder, "clear_cache"):          # newer TextEncoder: keeps the cache's byte count right
        encoder.clear_cache()
    elif getattr(encoder, "_cache", None) is not None:
        encoder._cache.clear()


def run_workflow(path: Path | str, *, train: bool = False, overrides: dict | None = None) -> Run:
    """Execute the workflow's graph with the pack's node classes (stored patches for Erase Concept unless
    ``train``), as a freshly started ComfyUI would (see forget_text_features). ``overrides``: {node_id:
    {input: value}} replaces widget values (e.g. a strength)."""
    import torch

    p = pack()
    wf = load(path)
    links = {link[0]: link for link in wf["links"]}
    run, current = Run(), [None]
    t0 = time.time()
    # Save Erasure Patch writes into models/erasure_patches: outside ComfyUI that is $SVARE_MODELS_DIR, here a
    # scratch folder (the bundled patches stay listed).
    with tempfile.TemporaryDirectory() as scratch, _env("SVARE_MODELS_DIR", scratch), recording(p, run, current):
        for node in order(wf):
            kind, nid = node["type"], node["id"]
            current[0] = nid
            if kind in OUTPUT_NODES:
                (link,) = [links[i["link"]] for i in node["inputs"] if i.get("link") is not None]
                run.shown[nid] = run.results[link[1]][link[2]]
                continue
            cls = p.NODE_CLASS_MAPPINGS[kind]
            kwargs = node_inputs(node, cls, run.results, links)
            kwargs.update((overrides or {}).get(nid, {}))
            stored = kind == "SvareEraseConcept" and not train
            with stored_erasure(p, Path(path), nid, stored), torch.inference_mode():
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
            run.results[nid] = out["result"] if isinstance(out, dict) else out
            if kind == "SvareLoadVAR":
                forget_text_features(run.results[nid][0])
    run.seconds = time.time() - t0
    return run


def nodes_of(wf: dict, kind: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == kind]


# -- checking the claims ----------------------------------------------------------------------------
def readings(path: Path | str, run: Run, unpatched: Run | None = None) -> dict[tuple[str, int], dict]:
    """What the oracle reads where the claims look: ("row", n) -> {before, after} of Compare; ("image", n) ->
    {before (strength 0), after} of the sampler; ("flag", n) -> {after, flagged}."""
    wf = load(path)
    out = {}
    for node in nodes_of(wf, "SvareCompare"):
        before, after = (captions(x) for x in run.drawn[node["id"]])
        out.update({("row", i + 1): {"before": b, "after": a} for i, (b, a) in enumerate(zip(before, after))})
    for node in nodes_of(wf, "SvareVARSampler"):
        images = run.results[node["id"]][0]
        after = captions(images)
        before = captions(unpatched.results[node["id"]][0]) if unpatched is not None else [None] * len(after)
        out.update({("image", i + 1): {"before": b, "after": a} for i, (b, a) in enumerate(zip(before, after))})
        for safety in nodes_of(wf, "SvareSafetyScore"):
            flags = json.loads(run.results[safety["id"]][3])
            out.update({("flag", i + 1): {"after": a, "flagged": f} for i, (a, f) in enumerate(zip(after, flags))})
    return out


def strength_zero(wf: dict) -> dict:
    """Overrides that switch every Apply Erasure Patch node off (strength 0)."""
    return {n["id"]: {"strength": 0.0} for n in nodes_of(wf, "SvareApplyErasurePatch")}


def check(path: Path | str, *, train: bool = False) -> tuple[list[str], dict, Run]:
    """Run the workflow and return (failed claims, readings, the run). The sampler's "before" is the same
    workflow with its patches at strength 0, run only when a claim needs it."""
    wf = load(path)
    cl = claims(wf)
    run = run_workflow(path, train=train)
    unpatched = None
    if any(c.kind == "image" for c in cl):
        unpatched = run_workflow(path, train=train, overrides=strength_zero(wf))
    seen = readings(path, run, unpatched)
    failed = []
    for c in cl:
        got = seen.get(("flag" if c.kind == "flag" else c.kind, c.index))
        if got is None:
            failed.append(f"{c.line}: the workflow has no {c.kind} {c.index}")
        elif c.kind == "flag":
            if got["after"] != c.after or got["flagged"] != c.flagged:
                failed.append(f"{c.line}: the oracle reads {got['after']!r}, "
                              f"{'flagged' if got['flagged'] else 'not flagged'}")
        elif (got["before"], got["after"]) != (c.before, c.after):
            failed.append(f"{c.line}: the oracle reads {got['before']!r} -> {got['after']!r}")
    return failed, seen, run


def to_8bit(images):
    """Images as ComfyUI's Save Image writes them: 255 * x, clipped, truncated to uint8."""
    import numpy as np

    return np.clip(255.0 * images.float().cpu().numpy(), 0, 255).astype(np.uint8)


def compare_runs(a: Run, b: Run) -> dict:
    """How two runs of one workflow differ: the sampled bits and the 8-bit images of every generate() call
    (equal or not), and the largest difference of the float images."""
    import numpy as np
    import torch

    keys = sorted(a.drawn)
    if keys != sorted(b.drawn) or any(len(a.drawn[k]) != len(b.drawn[k]) for k in keys):
        return {"bits_equal": False, "images_8bit_equal": False, "max_float_difference": float("inf")}
    pairs = [(x, y) for k in keys for x, y in zip(a.drawn[k], b.drawn[k])]
    bits = [(x, y) for k in keys for xs, ys in zip(a.bits[k], b.bits[k]) for x, y in zip(xs, ys)]
    return {"bits_equal": all(torch.equal(x, y) for x, y in bits),
            "images_8bit_equal": all(np.array_equal(to_8bit(x), to_8bit(y)) for x, y in pairs),
            "max_float_difference": max(float((x.float() - y.float()).abs().max()) for x, y in pairs)}


def patch_checksums(path: Path | str, run: Run) -> dict[int, str]:
    wf = load(path)
    return {n["id"]: run.results[n["id"]][0].checksum() for n in nodes_of(wf, "SvareEraseConcept")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="workflow names (file stems); default: all")
    ap.add_argument("--train", action="store_true", help="train Erase Concept nodes instead of the stored patches")
    ap.add_argument("--save-patches", action="store_true", help="with --train: store the trained patches as fixtures")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    paths = [p for p in workflows() if not args.names or p.stem in args.names]
    bad = 0
    for path in paths:
        failed, seen, run = check(path, train=args.train)
        print(f"== {path.stem} ({run.seconds:.0f} s, {args.threads} thread(s))")
        for (kind, i), r in sorted(seen.items()):
            print(f"  {kind} {i}: " + " | ".join(f"{k} {v}" for k, v in r.items() if v is not None))
        for nid, checksum in patch_checksums(path, run).items():
            print(f"  Erase Concept #{nid}: patch checksum {checksum}")
            if args.train and args.save_patches:
                dest = patch_fixture(path, nid)
                dest.parent.mkdir(parents=True, exist_ok=True)
                print(f"  saved {run.results[nid][0].save(dest)}")
        for f in failed:
            print(f"  CLAIM FAILS: {f}")
        if not failed:
            print(f"  the Note's {len(claims(load(path)))} claims hold")
        bad += bool(failed)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
