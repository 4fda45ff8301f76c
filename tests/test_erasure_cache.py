"""Issue 17: auxiliary tokens drawn in batches are the ones drawn one by one; teacher targets are cached
like the tokens (read back exactly, keyed by what they depend on); the CLI, the demo and the nodes keep
the cache by default, show where it is and how big, and clear it."""
from __future__ import annotations

import warnings

import pytest
import torch

from svare_core.__main__ import main
from svare_core.erasure import EraseConfig, erase, expand_concept, with_options
from svare_core.erasure import cache as erasure_cache
from svare_core.erasure import methods, trainer
from svare_core.erasure.tokens import auxiliary_tokens
from svare_core.models.format import save_model
from svare_core.sampling import SamplerSettings

from conftest import TINY_SCALES

PAIRS = expand_concept("red", "blue", "toy")[:2]
# Prompts of different token lengths, so a batch pads some of them.
PROMPTS = ["a red star", "a big blue circle on a green background", "a heart", "a small striped square"]


def test_batched_auxiliary_tokens_are_the_one_by_one_draws(tiny_pipeline):
    settings = SamplerSettings(cfg=4.0, top_p=0.97)
    kw = {"seeds": [0, 1], "settings": settings, "scales": TINY_SCALES}
    alone = auxiliary_tokens(tiny_pipeline, PROMPTS, batch_size=1, **kw)
    batched = auxiliary_tokens(tiny_pipeline, PROMPTS, batch_size=8, **kw)
    for p in PROMPTS:
        assert torch.equal(alone[p].labels, batched[p].labels) and torch.equal(alone[p].inputs, batched[p].inputs)
    with pytest.raises(ValueError, match="batch_size"):
        auxiliary_tokens(tiny_pipeline, PROMPTS, batch_size=0, **kw)


def test_aux_batch_fits_the_erasure_memory(tiny_pipeline):
    from svare_core import memory

    cfg = EraseConfig()
    b = trainer.aux_batch_size(tiny_pipeline, cfg, TINY_SCALES)
    assert 1 <= b <= 8
    assert memory.sampling_bytes(tiny_pipeline, b, TINY_SCALES, decode=False) <= memory.erasure_bytes(
        tiny_pipeline, cfg, TINY_SCALES) or b == 1


def run(pipe, cache, **kw):
    return erase(pipe, PAIRS, with_options(EraseConfig(), **{"steps": 2, "lr": 1e-3, "cache_dir": str(cache), **kw}),
                 preserve_prompts=["a green heart"])


@pytest.mark.parametrize("method", ["svare", "esd"])
def test_teacher_targets_are_cached_exactly(tiny_pipeline, tmp_path, monkeypatch, method):
    fresh = erase(tiny_pipeline, PAIRS, with_options(EraseConfig(), steps=2, lr=1e-3, method=method),
                  preserve_prompts=["a green heart"]).patch
    first = run(tiny_pipeline, tmp_path, method=method).patch
    (entry,) = (tmp_path / erasure_cache.TARGETS).glob("*.safetensors")

    def no_targets(self, run):
        raise AssertionError("the teacher targets should have come from the cache")

    monkeypatch.setattr(methods.METHODS[method], "teacher_targets", no_targets)
    second = run(tiny_pipeline, tmp_path, method=method).patch
    second_steps = run(tiny_pipeline, tmp_path, method=method, steps=3)       # the optimizer's settings: same targets
    assert second_steps.patch.meta["steps"] == 3
    for k in fresh.tensors:
        assert torch.equal(fresh.tensors[k], first.tensors[k]) and torch.equal(first.tensors[k], second.tensors[k])
    # What the targets depend on gives a new entry: the teacher's guidance, the pairs, another seed.
    for kw in ({"teacher_cfg": 2.0}, {"seed": 1}, {"preservation_weight": 0.7} if method == "svare" else {"esd_eta": 2.0}):
        with pytest.raises(AssertionError, match="from the cache"):
            run(tiny_pipeline, tmp_path, method=method, **kw)
    monkeypatch.undo()
    # An unreadable entry is removed, named, and recomputed.
    entry.write_bytes(entry.read_bytes()[:30])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run(tiny_pipeline, tmp_path, method=method).patch
    assert any(str(entry) in str(w.message) and "recomputed" in str(w.message) for w in caught)
    assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)


def test_usage_describe_and_clear(tiny_pipeline, tmp_path):
    assert erasure_cache.usage(tmp_path / "none") == (0, 0)
    run(tiny_pipeline, tmp_path)
    files, size = erasure_cache.usage(tmp_path)
    assert files == len(PAIRS) + 1 + 1 and size > 0           # tokens per safe prompt and preserved prompt, targets
    (tmp_path / "keep.txt").write_text("not an entry")
    assert erasure_cache.describe(tmp_path) == f"erasure cache {tmp_path}: {files} files, {size / 1e6:.2f} MB"
    assert erasure_cache.clear(tmp_path) == (files, size)
    assert erasure_cache.usage(tmp_path) == (0, 0) and (tmp_path / "keep.txt").exists()


def test_cli_keeps_the_cache_by_default_and_clears_it(tiny_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(erasure_cache.CACHE_ENV, str(tmp_path / "cache"))
    model = save_model(tmp_path / "tiny.safetensors", transformer=tiny_pipeline.transformer, vae=tiny_pipeline.vae,
                       text_encoder="minilm", scales=TINY_SCALES)
    args = ["erase", "--model", str(model), "--kind", "toy", "--concept", "red", "--anchor", "blue", "--steps", "1"]
    main([*args, "--out", str(tmp_path / "a.safetensors")])
    out = capsys.readouterr().out
    files, size = erasure_cache.usage(tmp_path / "cache")
    assert files > 0 and erasure_cache.describe(tmp_path / "cache") in out and "cache --clear" in out
    main([*args, "--out", str(tmp_path / "b.safetensors"), "--no-cache", "--cache-dir", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists() and "erasure cache" not in capsys.readouterr().out
    main(["cache"])
    assert capsys.readouterr().out.strip() == erasure_cache.describe(tmp_path / "cache")
    main(["cache", "--clear"])
    assert f"removed {files} files ({size / 1e6:.2f} MB)" in capsys.readouterr().out
    assert erasure_cache.usage(tmp_path / "cache") == (0, 0)


def test_erasure_cache_node(tmp_path, monkeypatch):
    from _pack import load_pack

    node = load_pack().NODE_CLASS_MAPPINGS["SvareErasureCache"]()
    monkeypatch.setenv(erasure_cache.CACHE_ENV, str(tmp_path))
    (tmp_path / "x.safetensors").write_bytes(b"12345")
    shown = node.show(clear=False)
    assert shown["result"] == (erasure_cache.describe(tmp_path),) and "1 file," in shown["result"][0]
    cleared = node.show(clear=True)["result"][0]
    assert cleared.startswith("removed 1 file (0.00 MB)") and "0 files" in cleared


def test_a_cache_hit_in_a_fresh_process_gives_the_cold_patch(tiny_pipeline, tmp_path):
    # Each CLI run is a new process: its text encoder has cached nothing, and a warm run reads tokens and
    # targets it never computed. On the tiny model the warm patch is the cold one, bit for bit. (On the toy
    # model, benchmarks/bench_targets.py measured a warm CLI run's patch up to 0.02 from the cold run's, with
    # the same erasure numbers; not explained yet, and not reproduced here: docs/benchmarks.md.)
    cfg = with_options(EraseConfig(), steps=3, lr=1e-3, pairs_per_step=2, cache_dir=str(tmp_path / "cache"))
    prompts = ["a green heart", "a big blue circle on a green background"]
    patches = []
    for _ in range(2):
        tiny_pipeline.text_encoder.clear_cache()
        patches.append(erase(tiny_pipeline, PAIRS, cfg, preserve_prompts=prompts).patch)
    cold, warm = patches
    assert all(torch.equal(cold.tensors[k], warm.tensors[k]) for k in cold.tensors)
