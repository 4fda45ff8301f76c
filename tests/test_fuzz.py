"""Property-based fuzzing of every reader of user input: the patch reader, the checkpoint reader, pair
parsing, sampler and erasure settings; plus a fixed corpus of malformed files. Each input must be refused
in one line or read exactly; never a traceback, never a silently wrong result (tests/fuzzing.py).

CI runs a short, bounded pass. The longer run documented in docs/reliability.md:
    SVARE_FUZZ_EXAMPLES=1000 SVARE_FUZZ_REPORT=docs/fuzz_results.json python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzzing  # noqa: E402
from fuzzing import (checkpoint_target, erase_settings_target, mutate, original_patch, pairs_target,  # noqa: E402
                     patch_metadata_target, patch_target, sampler_target, tiny_models, write_originals)

EXAMPLES = int(os.environ.get("SVARE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("SVARE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GOOD = {"refused", "accepted", "undetectable"}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    return write_originals(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("SVARE_FUZZ_REPORT")
    if path:
        counts = {t: dict(c) for t, c in sorted(fuzzing.COUNTS.items())}
        total = {"inputs": sum(sum(c.values()) for c in counts.values()),
                 "tracebacks": sum(c.get("traceback", 0) for c in counts.values()),
                 "silent_wrong": sum(c.get("silent_wrong", 0) for c in counts.values())}
        Path(path).write_text(json.dumps({"examples_per_property": EXAMPLES, "total": total, "targets": counts},
                                         indent=1) + "\n")


MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "overwrite"]),
                     st.lists(st.integers(0, 2**31), min_size=1, max_size=8), st.binary(min_size=1, max_size=16))
# Mutations aimed at the safetensors header (length, JSON, metadata), where most structure lives.
HEADER_MUTATION = st.tuples(st.sampled_from(["flip", "overwrite"]), st.lists(st.integers(0, 700), min_size=1,
                                                                             max_size=4),
                            st.binary(min_size=1, max_size=8))


@FUZZ
@given(st.one_of(MUTATION, HEADER_MUTATION))
def test_patch_reader(originals, mutation):
    data = mutate(originals["patch"].read_bytes(), *mutation)
    assert patch_target(data, original_patch()) in GOOD - {"undetectable"}


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FIELDS = ["base_fingerprint", "concepts", "method", "steps", "lora_scale", "pairs", "trained_on", "hyperparameters"]


@FUZZ
@given(st.one_of(JSON, st.fixed_dictionaries({}, optional={f: JSON for f in FIELDS})))
def test_patch_metadata_of_any_type(meta):
    assert patch_metadata_target(meta) in GOOD - {"undetectable"}


@FUZZ
@given(st.one_of(MUTATION, HEADER_MUTATION), st.sampled_from(["svare_model", "pth"]))
def test_checkpoint_reader(originals, mutation, which):
    data = mutate(originals[which].read_bytes(), *mutation)
    suffix = ".safetensors" if which == "svare_model" else ".pth"
    assert checkpoint_target(data, suffix, tiny_models()) in GOOD


PAIR_TEXT = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(["a red star => a blue star", "=>", " => x",
                                                                      "# note", "a red cat=>a blue cat", ""])),
                     max_size=6).map("\n".join)


@FUZZ
@given(PAIR_TEXT, st.sampled_from(["", "red", "red, star", "x"]), st.sampled_from(["object", "style", "toy"]),
       st.sampled_from(["", ".txt", ".csv", ".json"]))
def test_pair_parsing(text, concepts, kind, suffix):
    assert pairs_target(text, concepts, kind, suffix) in GOOD - {"undetectable"}


NUMBER = st.one_of(st.floats(), st.integers(-10, 10), st.none(), st.text(max_size=3), st.booleans())


@FUZZ
@given(st.fixed_dictionaries({}, optional={"cfg": st.one_of(NUMBER, st.lists(st.floats(), max_size=3)),
                                           "tau": NUMBER, "top_p": NUMBER, "top_k": NUMBER,
                                           "negative_prompt": st.one_of(st.none(), st.text(max_size=5), st.integers())}),
       st.one_of(st.integers(-5, 2**64), st.floats(), st.text(max_size=2)))
def test_sampler_settings(tiny_pipeline, options, seed):
    assert sampler_target(tiny_pipeline, options, seed) in GOOD - {"undetectable"}


@FUZZ
@given(st.fixed_dictionaries({}, optional={name: NUMBER for name in (
    "method", "steps", "lr", "trainable", "lora_rank", "preservation_weight", "preserve_per_step", "pairs_per_step",
    "teacher_cfg", "student_cfg", "token_error_rate", "aux_samples", "seed", "precision")}))
def test_erasure_settings(options):
    assert erase_settings_target(options) in GOOD - {"undetectable"}


# -- a fixed corpus of malformed files, each with the error it must give ------------------------------------------
def _corpus(originals: dict[str, Path], folder: Path) -> list[tuple[str, Path, str]]:
    """(reader, file, expected message) for the classic faults: truncated, bit-flipped, wrong types, wrong shapes."""
    from svare_core.models.format import atomic_save_safetensors, save_model

    patch, model = originals["patch"].read_bytes(), originals["svare_model"].read_bytes()
    cases = []

    def add(reader, name, data, expected):
        path = folder / name
        path.write_bytes(data)
        cases.append((reader, path, expected))

    add("patch", "empty.safetensors", b"", "cannot be read")
    add("patch", "truncated_header.safetensors", patch[:40], "cannot be read")
    add("patch", "truncated_data.safetensors", patch[:-100], "cannot be read")
    add("patch", "flipped_data.safetensors", mutate(patch, "flip", [len(patch) - 9], b"\x03"), "checksum")
    add("patch", "not_a_patch.safetensors", model, "is not an erasure patch")
    add("model", "empty_model.safetensors", b"", "empty or truncated")
    add("model", "truncated_model.safetensors", model[:len(model) // 2], "truncated")
    add("model", "flipped_model.safetensors", mutate(model, "flip", [len(model) - 7], b"\x05"), "checksum")
    add("model", "garbage.pth", os.urandom(256), "cannot be read")
    transformer, _ = tiny_models()
    wrong = {k: (torch.zeros(3, 3) if k == "word_embed.weight" else v) for k, v in transformer.state_dict().items()}
    torch.save(wrong, folder / "wrong_shape.pth")
    cases.append(("model", folder / "wrong_shape.pth", "shapes do not fit"))
    nan = {k: (torch.full_like(v, float("nan")) if k == "head.weight" else v) for k, v in transformer.state_dict().items()}
    torch.save(nan, folder / "nan.pth")
    cases.append(("model", folder / "nan.pth", "NaN or infinite"))
    bad_config = save_model(folder / "bad_config.safetensors", transformer=transformer,
                            extra={"transformer_config": "{\"depth\": \"two\"}"})
    cases.append(("model", bad_config, "config does not describe a buildable"))
    typed = original_patch()
    tensors = dict(typed.tensors)
    atomic_save_safetensors(tensors, folder / "meta_not_json.safetensors",
                            {"format": "svare-erasure-patch", "format_version": "2", "svare_patch": "{concepts",
                             "checksum": "0"})
    cases.append(("patch", folder / "meta_not_json.safetensors", "checksum"))
    atomic_save_safetensors(tensors, folder / "version_text.safetensors",
                            {"format": "svare-erasure-patch", "format_version": "two", "svare_patch": "{}"})
    cases.append(("patch", folder / "version_text.safetensors", "format version 'two' is not a number"))
    return cases


def test_malformed_file_corpus(originals, tmp_path):
    from svare_core.erasure import ErasurePatch, PatchError
    from svare_core.models import ModelLoadError, load_transformer, load_vae

    def load_model(path):
        load_transformer(path)
        if path.suffix == ".safetensors":
            load_vae(path)

    cases = _corpus(originals, tmp_path)
    assert len(cases) >= 14
    for reader, path, expected in cases:
        error = PatchError if reader == "patch" else ModelLoadError
        with pytest.raises(error) as e:
            (ErasurePatch.load if reader == "patch" else load_model)(path)
            pytest.fail(f"{path.name} was read without an error")
        message = str(e.value)
        assert expected in message and path.name in message and "\n" not in message, (path.name, message)


def _metadata_span(data: bytes) -> range:
    """Byte positions of a safetensors file's ``__metadata__`` object: from its key to the first tensor
    entry after it (or the end of the header)."""
    import struct

    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    start = data.index(b'"__metadata__"')
    ends = [i for i in (data.find(k, start, header_end) for k in (b'"transformer.', b'"vae.', b'"block_chunks.'))
            if i > 0]
    return range(start, min(ends, default=header_end))


@pytest.mark.parametrize("which", ["patch", "svare_model"])
def test_every_bit_flip_in_the_metadata_is_caught(originals, which):
    """Exhaustive over the metadata (two bits of every byte): a bit flip in a key's name once turned
    ``transformer_checksum`` into a key the checksums skipped; now each flip is refused or harmless."""
    data = originals[which].read_bytes()
    models, patch = tiny_models(), original_patch()
    outcomes = set()
    for pos in _metadata_span(data):
        for bit in (b"\x00", b"\x05"):
            mutated = mutate(data, "flip", [pos, len(data) - 3], bit)     # and one bit of the last tensor
            outcomes.add(patch_target(mutated, patch) if which == "patch" else
                         checkpoint_target(mutated, ".safetensors", models))
    assert len(_metadata_span(data)) > 300 and outcomes <= {"refused", "accepted"}, outcomes
