"""Fuzz targets: feed one malformed input to a reader and classify what it did.

Outcomes:
- ``refused``: the reader raised its clean error (one non-empty line);
- ``accepted``: it read the input and the result is exactly what the original file held (a
  mutation the format ignores, e.g. whitespace of a JSON header) or, for inputs that carry no
  original (settings, pair text), a result that satisfies the reader's promises;
- ``undetectable``: it read changed tensor values from a format that carries no checksum
  (released .pth files): no loader can tell, so these are counted apart, never hidden;
- ``silent_wrong``: it returned something other than what the file held, or broke a promise;
- ``traceback``: it raised anything else.
tests/test_fuzz.py drives these with hypothesis and asserts no ``silent_wrong`` and no
``traceback``; with SVARE_FUZZ_REPORT set it writes the counts (docs/reliability.md).
"""
from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import torch

from svare_core.erasure import ErasurePatch, PatchError, PromptPair, build_pairs, load_pairs, parse_pairs
from svare_core.erasure.config import EraseConfig
from svare_core.models import ModelLoadError, load_transformer, load_vae
from svare_core.models.format import save_model
from svare_core.models.infinity import Infinity
from svare_core.models.vae import BSQVAE
from svare_core.sampling import SamplerSettings, generate

from conftest import randomise, tiny_transformer_config, tiny_vae_config

COUNTS: dict[str, Counter] = {}


def record(target: str, outcome: str) -> str:
    COUNTS.setdefault(target, Counter())[outcome] += 1
    return outcome


def _clean(e: Exception) -> bool:
    text = str(e)
    return bool(text.strip()) and "\n" not in text.strip()


# -- originals ---------------------------------------------------------------------------------------------
def tiny_models() -> tuple[Infinity, BSQVAE]:
    torch.manual_seed(0)
    return (randomise(Infinity(tiny_transformer_config())).eval(),
            randomise(BSQVAE(tiny_vae_config()), seed=1).eval())


def original_patch() -> ErasurePatch:
    g = torch.Generator().manual_seed(0)
    tensors = {"block_chunks.0.module.0.ca.proj.weight": torch.randn(64, 64, generator=g) * 0.01,
               "block_chunks.0.module.0.ffn.fc1.bias": torch.randn(128, generator=g) * 0.01,
               "block_chunks.1.module.0.ca.mat_q.weight.lora_A": torch.randn(2, 64, generator=g),
               "block_chunks.1.module.0.ca.mat_q.weight.lora_B": torch.randn(64, 2, generator=g)}
    meta = {"base_fingerprint": "0123456789abcdef", "concepts": ["red"], "method": "svare", "steps": 3,
            "lora_scale": 0.5, "pairs": [["a red star", "a blue star"]], "metrics": {}, "hyperparameters": {"lr": 1e-3}}
    return ErasurePatch(tensors, meta)


def write_originals(folder: Path) -> dict[str, Path]:
    """The valid files the mutations start from: a patch, a svare model file, a released-style .pth."""
    transformer, vae = tiny_models()
    files = {"patch": original_patch().save(folder / "patch.safetensors"),
             "svare_model": save_model(folder / "model.safetensors", transformer=transformer, vae=vae,
                                       text_encoder="minilm")}
    torch.save(transformer.state_dict(), folder / "released.pth")
    files["pth"] = folder / "released.pth"
    return files


# -- mutations -----------------------------------------------------------------------------------------------
def mutate(data: bytes, kind: str, positions: list[int], values: bytes) -> bytes:
    """``kind``: truncate (at positions[0]), flip (one bit at each position), overwrite (values from
    positions[0])."""
    n = len(data)
    if kind == "truncate":
        return data[: positions[0] % n]
    out = bytearray(data)
    if kind == "flip":
        for i, p in enumerate(positions):
            out[p % n] ^= 1 << (values[i % len(values)] % 8 if values else 0)
    else:
        start = positions[0] % n
        out[start:start + len(values)] = values
    return bytes(out)


def _scratch(data: bytes, suffix: str) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


# -- targets -------------------------------------------------------------------------------------------------
def patch_target(data: bytes, original: ErasurePatch) -> str:
    path = _scratch(data, ".safetensors")
    try:
        loaded = ErasurePatch.load(path)
    except PatchError as e:
        return record("patch reader", "refused" if _clean(e) else "traceback")
    except Exception:  # noqa: BLE001 - what the fuzzer is looking for
        return record("patch reader", "traceback")
    finally:
        path.unlink(missing_ok=True)
    same = loaded.meta == original.meta and loaded.tensors.keys() == original.tensors.keys() and all(
        torch.equal(loaded.tensors[k], original.tensors[k]) for k in original.tensors)
    return record("patch reader", "accepted" if same else "silent_wrong")


def patch_metadata_target(meta: object) -> str:
    """A patch file whose metadata JSON is anything (with a valid checksum): refused, or it holds the promised types."""
    import json

    from svare_core.erasure.patches import PATCH_FORMAT, PATCH_VERSION, _file_checksum
    from svare_core.models.format import atomic_save_safetensors

    tensors = original_patch().tensors
    body = json.dumps(meta)
    path = Path(tempfile.mkdtemp()) / "typed.safetensors"
    atomic_save_safetensors(tensors, path, {"format": PATCH_FORMAT, "format_version": str(PATCH_VERSION),
                                            "svare_patch": body, "checksum": _file_checksum(tensors, body)})
    try:
        loaded = ErasurePatch.load(path)
        loaded.validate()
        ok = isinstance(loaded.meta, dict) and all(isinstance(c, str) for c in loaded.concepts) \
            and isinstance(loaded.base_fingerprint, str)
        return record("patch metadata", "accepted" if ok else "silent_wrong")
    except PatchError as e:
        return record("patch metadata", "refused" if _clean(e) else "traceback")
    except Exception:  # noqa: BLE001
        return record("patch metadata", "traceback")
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def checkpoint_target(data: bytes, suffix: str, originals: tuple[Infinity, BSQVAE]) -> str:
    """A mutated model file: refused, or loaded with exactly the original weights."""
    target = "checkpoint reader (svare file)" if suffix == ".safetensors" else "checkpoint reader (released .pth)"
    path = _scratch(data, suffix)
    try:
        transformer = load_transformer(path)
        vae = load_vae(path) if suffix == ".safetensors" else None
    except ModelLoadError as e:
        return record(target, "refused" if _clean(e) else "traceback")
    except Exception:  # noqa: BLE001
        return record(target, "traceback")
    finally:
        path.unlink(missing_ok=True)
    same = _same_state(transformer, originals[0]) and (vae is None or _same_state(vae, originals[1]))
    if same:
        return record(target, "accepted")
    # A released .pth carries no checksum: changed values that are still finite cannot be told from real ones.
    return record(target, "undetectable" if suffix == ".pth" else "silent_wrong")


def pairs_target(text: str, concepts: str, kind: str, suffix: str) -> str:
    """Pair text (inline, or a file of pairs): refused, or pairs that keep the promises (non-empty, naming
    their concept, no duplicates, never a pair with the same prompt twice)."""
    try:
        if suffix:
            path = _scratch(text.encode("utf-8", "surrogatepass"), suffix)
            try:
                pairs = load_pairs(path)
            finally:
                path.unlink(missing_ok=True)
            parse_pairs("")            # the file path exercised; inline below exercises build_pairs
        else:
            pairs = build_pairs(concepts, "", kind, text)
    except ValueError as e:
        return record("pair parsing", "refused" if _clean(e) else "traceback")
    except Exception:  # noqa: BLE001
        return record("pair parsing", "traceback")
    from svare_core.erasure.pairs import mentions

    ok = all(isinstance(p, PromptPair) and p.unsafe.strip() and p.safe.strip() for p in pairs)
    if not suffix:
        keys = [(p.unsafe.strip().lower(), p.safe.strip().lower()) for p in pairs]
        ok = ok and bool(pairs) and len(set(keys)) == len(keys) and all(
            p.concept and mentions(p.unsafe, p.concept) and p.unsafe.strip().lower() != p.safe.strip().lower()
            for p in pairs)
    return record("pair parsing", "accepted" if ok else "silent_wrong")


def sampler_target(pipe, settings: dict, seed: object) -> str:
    """Any sampler settings and seed: refused, or finite images in [0, 1]."""
    try:
        s = SamplerSettings(**settings)
        result = generate(pipe, ["a red star"], seed=seed, settings=s, scales=[(1, 1), (2, 2)])
    except ValueError as e:
        return record("sampler settings", "refused" if _clean(e) else "traceback")
    except Exception:  # noqa: BLE001
        return record("sampler settings", "traceback")
    images = result.images
    ok = bool(torch.isfinite(images).all()) and float(images.min()) >= 0 and float(images.max()) <= 1
    return record("sampler settings", "accepted" if ok else "silent_wrong")


def erase_settings_target(options: dict) -> str:
    """Any erasure settings: validate() refuses them in one line, or every number is usable."""
    try:
        cfg = EraseConfig(**options)
        cfg.validate()
    except ValueError as e:
        return record("erasure settings", "refused" if _clean(e) else "traceback")
    except Exception:  # noqa: BLE001
        return record("erasure settings", "traceback")
    numbers = [v for v in cfg.options().values() if isinstance(v, float)]
    ok = all(math.isfinite(v) for v in numbers) and cfg.steps >= 1 and cfg.lr > 0
    return record("erasure settings", "accepted" if ok else "silent_wrong")
