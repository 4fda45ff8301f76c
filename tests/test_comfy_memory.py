"""Memory the ComfyUI way, without ComfyUI: a fake comfy.model_management / comfy.model_patcher
(injected into sys.modules) records what the nodes ask of it.

Checked: Load VAR registers the transformer, VAE and text encoder as ModelPatchers and frees room
before loading; the sampler, Compare and Erase Concept load them with load_models_gpu (whole, with an
estimate of the working memory, outside inference mode) before working and empty the cache after;
patchers are made once per pipeline and shared between pipelines that share parts; the pack's caches
can be evicted (pipelines held weakly, detectors bounded and dropped when ComfyUI unloads them, text
features bounded); an out-of-memory error becomes one line that says what to change. The real
ComfyUI run is tests/integration/test_comfyui_memory.py.
"""
from __future__ import annotations

import gc
import sys
import types

import pytest
import torch
from _pack import load_pack
from test_nodes import defaults, run, tiny_patch  # noqa: F401 (a fixture)

import svare_core.loader
from svare_core import memory
from svare_core.erasure.config import EraseConfig
from svare_core.safety import registry

pack = load_pack()
adapter = pack.nodes.comfy_adapter


class FakeComfy:
    """Just enough of comfy.model_management + comfy.model_patcher to record calls and move modules
    the way ComfyUI does (load: to the load device, whole; unload: to the offload device, callbacks)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.calls: list[tuple] = []
        self.current_loaded_models: list = []
        fake = self

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
                self.callbacks: dict[str, list] = {}
                if not hasattr(model, "device"):
                    model.device = offload_device
                model.model_loaded_weight_memory = 0     # ComfyUI's bookkeeping, written onto the module
                fake.calls.append(("ModelPatcher", type(model).__name__, load_device, offload_device, size))

            def add_callback(self, kind, fn):
                self.callbacks.setdefault(kind, []).append(fn)

            def model_size(self):
                return self.size

            def load(self):
                self.model.to(self.load_device)
                self.model.device = self.load_device

            def detach(self, unpatch_all=True):
                self.model.to(self.offload_device)
                self.model.device = self.offload_device
                for fn in self.callbacks.get("on_detach_after", []):
                    fn(self, unpatch_all)

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):
            fake.calls.append(("load_models_gpu", list(models), memory_required, force_full_load,
                               torch.is_inference_mode_enabled()))
            for m in models:
                m.load()
                if m not in fake.current_loaded_models:
                    fake.current_loaded_models.insert(0, m)

        def free_memory(memory_required, device, keep_loaded=()):
            fake.calls.append(("free_memory", memory_required, device))
            gone = [m for m in fake.current_loaded_models if m.load_device == device and m not in keep_loaded]
            for m in gone:
                m.detach()
                fake.current_loaded_models.remove(m)
            return gone

        self.mm = types.SimpleNamespace(
            load_models_gpu=load_models_gpu, free_memory=free_memory,
            unload_all_models=lambda: free_memory(1e30, fake.device),
            soft_empty_cache=lambda force=False: fake.calls.append(("soft_empty_cache",)),
            get_torch_device=lambda: fake.device, unet_offload_device=lambda: torch.device("cpu"),
            vae_offload_device=lambda: torch.device("cpu"), text_encoder_offload_device=lambda: torch.device("cpu"),
            extra_reserved_memory=lambda: 400 * 2**20, throw_exception_if_processing_interrupted=lambda: None,
            current_loaded_models=self.current_loaded_models)
        self.mp = types.SimpleNamespace(ModelPatcher=ModelPatcher)
        self.ext = types.SimpleNamespace(CallbacksMP=types.SimpleNamespace(ON_DETACH="on_detach_after"))

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    def loaded_classes(self) -> list[str]:
        return sorted(type(m.model).__name__ for m in self.current_loaded_models)


@pytest.fixture()
def comfy(monkeypatch):
    fake = FakeComfy()
    root = types.ModuleType("comfy")
    for name, mod in (("comfy", root), ("comfy.model_management", fake.mm), ("comfy.model_patcher", fake.mp),
                      ("comfy.patcher_extension", fake.ext)):
        monkeypatch.setitem(sys.modules, name, mod)
    adapter.install_memory_hooks()        # this import's hooks (pytest may import the pack twice)
    adapter._BY_PIPE.clear()
    adapter._CACHES.clear()
    registry.clear_cache()
    yield fake
    adapter._BY_PIPE.clear()
    adapter._CACHES.clear()
    registry.clear_cache()


def sample_args(pipe, **kw):
    return defaults("SvareVARSampler", model=pipe, **kw)


# -- registration and loading -----------------------------------------------------------------------
def test_without_comfyui_everything_is_a_no_op(tiny_pipeline):
    assert "comfy.model_management" not in sys.modules
    assert adapter.managed(tiny_pipeline) is None
    adapter.load_for_use(tiny_pipeline, 123)
    adapter.free_memory_for({"cuda:0": 2**30})
    adapter.track_caches()
    adapter.empty_cache()
    (images,) = run("SvareVARSampler", **sample_args(tiny_pipeline))
    assert images.shape[0] == 1


def test_the_parts_are_modelpatchers_made_once_per_pipeline(comfy, tiny_pipeline):
    patchers = adapter.managed(tiny_pipeline)
    assert set(patchers) == {"transformer", "vae", "text_encoder"}
    assert patchers["transformer"].model.inner is tiny_pipeline.transformer
    assert patchers["vae"].model.inner is tiny_pipeline.vae
    assert patchers["text_encoder"].model.inner is tiny_pipeline.text_encoder.model
    assert [type(p.model).__name__ for p in patchers.values()] == ["SvareTransformer", "SvareVAE", "SvareTextEncoder"]
    for p in patchers.values():
        assert p.load_device == torch.device("cpu") and p.offload_device == torch.device("cpu")
        assert p.size == memory.module_bytes(p.model.inner) > 0
    assert adapter.managed(tiny_pipeline) is patchers                    # cached per pipeline
    # ComfyUI's bookkeeping lands on the holder, never on svare's modules (whose device is a property).
    assert not hasattr(tiny_pipeline.transformer, "model_loaded_weight_memory")
    assert tiny_pipeline.transformer.device == torch.device("cpu")


def test_load_var_frees_room_first_and_registers_the_parts(comfy, tiny_pipeline, tmp_path, monkeypatch):
    from test_nodes import _tiny_model_file
    path = _tiny_model_file(tiny_pipeline, tmp_path / "toyworld.safetensors")
    monkeypatch.setitem(svare_core.plugins.registry()._items["bundled_model"], "toyworld", path)
    asked = []
    monkeypatch.setattr(adapter, "free_memory_for", lambda sizes: asked.append(sizes))
    svare_core.loader.load_pipeline_cached.cache_clear()
    (pipe,) = run("SvareLoadVAR", **defaults("SvareLoadVAR", device="cpu"))
    # before_load went through the hook with the bytes about to land on each device
    assert len(asked) == 1 and set(asked[0]) == {"cpu"}
    assert asked[0]["cpu"] >= memory.module_bytes(pipe.transformer)
    (load,) = comfy.named("load_models_gpu")
    assert load[2] == 0 and load[3] is True and load[4] is False       # whole, outside inference mode
    assert comfy.loaded_classes() == ["SvareTextEncoder", "SvareTransformer", "SvareVAE"]
    svare_core.loader.load_pipeline_cached.cache_clear()


def test_free_memory_for_frees_gpus_not_the_cpu(comfy):
    adapter.free_memory_for({"cpu": 2**30, "cuda:0": 2**30, "cuda": 0})
    (call,) = comfy.named("free_memory")
    assert call[2] == torch.device("cuda", 0) and call[1] == pytest.approx(2**30 * 1.1 + 400 * 2**20)


def test_sampler_loads_the_parts_with_working_memory_then_empties_the_cache(comfy, tiny_pipeline):
    run("SvareVARSampler", **sample_args(tiny_pipeline, batch_size=2))
    loads = comfy.named("load_models_gpu")
    assert len(loads) == 1
    _, models, required, full, inference = loads[0]
    assert {type(m.model).__name__ for m in models} == {"SvareTransformer", "SvareVAE", "SvareTextEncoder"}
    assert full is True and inference is False
    scales = tiny_pipeline.default_scales()
    assert required == memory.sampling_bytes(tiny_pipeline, 2, scales) > 0
    assert required > memory.sampling_bytes(tiny_pipeline, 1, scales)
    assert comfy.calls[-1] == ("soft_empty_cache",)
    run("SvareVARSampler", **sample_args(tiny_pipeline))
    assert comfy.named("load_models_gpu")[1][1] == models                 # the same patchers again


def test_an_offloaded_model_is_loaded_back_before_use(comfy, tiny_pipeline):
    run("SvareVARSampler", **sample_args(tiny_pipeline))
    assert len(comfy.current_loaded_models) == 3
    comfy.mm.unload_all_models()                                          # what /free does
    assert comfy.current_loaded_models == []
    run("SvareVARSampler", **sample_args(tiny_pipeline))
    assert comfy.loaded_classes() == ["SvareTextEncoder", "SvareTransformer", "SvareVAE"]


def test_patched_models_share_the_vae_and_text_encoder_patchers(comfy, tiny_patch):  # noqa: F811
    pipe, patch, _, _ = tiny_patch
    (patched,) = run("SvareApplyErasurePatch", model=pipe, patch=patch, strength=1.0, force=False)
    a, b = adapter.managed(pipe), adapter.managed(patched)
    assert a["vae"] is b["vae"] and a["text_encoder"] is b["text_encoder"]
    assert a["transformer"] is not b["transformer"] and b["transformer"].model.inner is patched.transformer
    assert b["transformer"].load_device == a["transformer"].load_device


def test_compare_loads_each_model_before_drawing_it(comfy, tiny_patch):  # noqa: F811
    pipe, patch, _, _ = tiny_patch
    (patched,) = run("SvareApplyErasurePatch", model=pipe, patch=patch, strength=1.0, force=False)
    run("SvareCompare", **defaults("SvareCompare", model_before=pipe, model_after=patched, prompts="a red star"))
    loads = comfy.named("load_models_gpu")
    inner = [next(m.model.inner for m in c[1] if type(m.model).__name__ == "SvareTransformer") for c in loads]
    assert inner == [pipe.transformer, patched.transformer]


def test_erasure_frees_room_for_training_once(comfy, tiny_pipeline):
    run("SvareEraseConcept", **defaults("SvareEraseConcept", model=tiny_pipeline, steps=2))
    loads = comfy.named("load_models_gpu")
    # one load for the run: the targets it draws inside (auxiliary tokens) place nothing again
    assert len(loads) == 1 and loads[0][3] is True and loads[0][4] is False
    assert loads[0][2] >= memory.sampling_bytes(tiny_pipeline, 1, tiny_pipeline.default_scales("1:1", "0.06M"),
                                                decode=False) > 0
    assert comfy.named("soft_empty_cache") and comfy.calls[-1] == ("soft_empty_cache",)


def test_memory_estimates_grow_with_the_work(tiny_pipeline):
    s = [(1, 1), (2, 2), (4, 4)]
    assert memory.sampling_bytes(tiny_pipeline, 4, s) > memory.sampling_bytes(tiny_pipeline, 1, s)
    assert memory.sampling_bytes(tiny_pipeline, 1, s, guided=False) < memory.sampling_bytes(tiny_pipeline, 1, s)
    assert memory.sampling_bytes(tiny_pipeline, 1, s + [(8, 8)]) > memory.sampling_bytes(tiny_pipeline, 1, s)
    dense = memory.erasure_bytes(tiny_pipeline, EraseConfig(trainable="xattn_ffn"), s)
    lora = memory.erasure_bytes(tiny_pipeline, EraseConfig(trainable="lora"), s)
    ckpt = memory.erasure_bytes(tiny_pipeline, EraseConfig(trainable="lora", gradient_checkpointing=True), s)
    assert dense > lora > 0 and ckpt <= lora
    assert memory.estimate(memory.sampling_bytes, object(), 1, s) == 0      # a model of another shape: no guess


def test_a_task_inside_another_on_the_same_pipeline_places_nothing(tiny_pipeline):
    seen = []
    host = memory.register_host(memory.Host(name="test", prepare=lambda p, n, t: seen.append(t), release=lambda t: seen.append("r")))
    try:
        with memory.use(tiny_pipeline, 1, "outer"):
            with memory.use(tiny_pipeline, 1, "inner"):
                pass
            assert memory.active() == [tiny_pipeline]
    finally:
        memory.unregister_host(host)
    assert seen == ["outer", "r"]


# -- caches ComfyUI can evict ---------------------------------------------------------------------
def test_loaded_pipelines_are_held_weakly(tiny_pipeline, tmp_path, monkeypatch):
    from test_nodes import _tiny_model_file
    path = _tiny_model_file(tiny_pipeline, tmp_path / "toyworld.safetensors")
    monkeypatch.setitem(svare_core.plugins.registry()._items["bundled_model"], "toyworld", path)
    cache = svare_core.loader.load_pipeline_cached
    cache.cache_clear()
    args = defaults("SvareLoadVAR", device="cpu")
    (pipe,) = run("SvareLoadVAR", **args)
    assert run("SvareLoadVAR", **args)[0] is pipe and len(cache) == 1  # reused while someone holds it
    del pipe
    gc.collect()
    assert len(cache) == 0                                             # and freed when nobody does
    cache.cache_clear()


def test_pipelines_and_their_patchers_are_freed_together(comfy, tiny_pipeline):
    import weakref
    pipe = tiny_pipeline.with_transformer(tiny_pipeline.clone_transformer())
    run("SvareVARSampler", **sample_args(pipe))
    patcher = weakref.ref(adapter.managed(pipe)["transformer"])
    comfy.current_loaded_models.clear()                                # ComfyUI holds them weakly
    comfy.calls.clear()
    del pipe
    gc.collect()
    assert patcher() is None and not adapter._BY_PIPE


def test_the_detector_cache_is_bounded_and_dropped_when_comfyui_unloads_it(comfy, monkeypatch):
    monkeypatch.setattr(registry, "MAX_CACHED", 2)
    made = [registry.get_detector("toyworld"), registry.get_detector("toy")]
    assert registry.cached_detectors() == 1 and made[0] is made[1]
    images = torch.rand(1, 16, 16, 3)
    run("SvareSafetyScore", images=images, detector="toyworld", concept="red", threshold=0.5, censor=False)
    assert "SvareCaches" in comfy.loaded_classes()
    comfy.mm.unload_all_models()
    assert registry.cached_detectors() == 0


def test_detector_cache_keeps_the_most_recent(monkeypatch):
    monkeypatch.setattr(registry, "MAX_CACHED", 2)
    registry.clear_cache()
    built = []

    class Dummy:
        def __init__(self, **options):
            built.append(options)
    monkeypatch.setattr(registry, "_backends", lambda: {"dummy": (__name__, "Dummy", (), "")})
    monkeypatch.setattr(sys.modules[__name__], "Dummy", Dummy, raising=False)
    for k in (1, 2, 1, 3, 1):
        registry.get_detector("dummy", k=k)
    assert registry.cached_detectors() == 2 and [b["k"] for b in built] == [1, 2, 3]
    registry.clear_cache()


def test_text_feature_cache_is_bounded_in_bytes(text_encoder):
    old = text_encoder._cache.max_bytes
    text_encoder.clear_cache()
    try:
        text_encoder._cache.max_bytes = 1
        feats, mask = text_encoder.encode(["a red star", "a blue circle"])
        assert feats.shape[0] == 2 and len(text_encoder._cache) <= 1
        text_encoder._cache.max_bytes = old
        text_encoder.encode(["a red star", "a blue circle"])
        assert len(text_encoder._cache) == 2 and text_encoder._cache.nbytes == feats[mask].numel() * 4
        text_encoder.clear_cache()
        assert len(text_encoder._cache) == 0 and text_encoder._cache.nbytes == 0
    finally:
        text_encoder._cache.max_bytes = old


def test_a_prompts_features_do_not_depend_on_what_is_encoded_with_it_or_before(text_encoder):
    """A cached prompt must give what a fresh session gives: encoded alone, among longer and shorter
    prompts, or after the cache saw it in another batch, its features are the same bits."""
    prompt = "a red circle"
    text_encoder.clear_cache()
    alone, _ = text_encoder.encode([prompt])
    text_encoder.clear_cache()
    feats, mask = text_encoder.encode(["a dotted purple heart on a gray background", prompt, "x", "a blue star"])
    assert int(mask[0].sum()) > int(mask[1].sum()) > int(mask[2].sum())   # really of three lengths
    assert torch.equal(feats[1, : int(mask[1].sum())], alone[0])
    assert torch.equal(text_encoder.encode([prompt])[0][0], alone[0])       # the cached copy
    # prompts of one length, many at once: the matmul's blocking over the batch must not show either
    from svare_core.toyworld.pairs import preserve_prompts
    prompts = preserve_prompts("red")
    text_encoder.clear_cache()
    together, mask = text_encoder.encode(prompts)
    for i, p in enumerate(prompts):
        text_encoder.clear_cache()
        assert torch.equal(together[i, : int(mask[i].sum())], text_encoder.encode([p])[0][0]), p
    text_encoder.clear_cache()


# -- out of memory --------------------------------------------------------------------------------
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which "
            "1.12 GiB is free. Including non-PyTorch memory, this process has 22.40 GiB memory in use.")


@pytest.mark.parametrize("node,module,task,words", [
    ("SvareVARSampler", "sampler", "sampling", ["resolution", "batch_size", "bf16", "offload_text_encoder"]),
    ("SvareCompare", "compare", "compare", ["fewer prompts", "resolution", "bf16"]),
    ("SvareEraseConcept", "erasure", "erasure", ["lora", "bf16", "gradient checkpointing", "offload_text_encoder"]),
])
def test_out_of_memory_becomes_one_line_saying_what_to_change(comfy, tiny_pipeline, monkeypatch, node, module,
                                                             task, words):
    def oom(*a, **k):
        raise torch.OutOfMemoryError(CUDA_OOM)
    target = getattr(pack.nodes, module)
    monkeypatch.setattr(target, "erase" if module == "erasure" else "generate", oom)
    args = {"SvareVARSampler": lambda: sample_args(tiny_pipeline),
            "SvareCompare": lambda: defaults("SvareCompare", model_before=tiny_pipeline, model_after=tiny_pipeline),
            "SvareEraseConcept": lambda: defaults("SvareEraseConcept", model=tiny_pipeline, steps=1)}[node]()
    comfy.calls.clear()
    with pytest.raises(torch.OutOfMemoryError) as err:
        run(node, **args)
    text = str(err.value)
    assert "\n" not in text and "ran out of GPU memory" in text and "2.00 GiB" in text
    assert all(w in text for w in words), text
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert ("soft_empty_cache",) in comfy.calls


def test_cpu_allocation_failure_is_a_memory_error_and_other_errors_pass(tiny_pipeline, monkeypatch):
    sampler = pack.nodes.sampler

    def cpu_oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(sampler, "generate", cpu_oom)
    with pytest.raises(MemoryError, match=r"^VAR Sampler ran out of memory \(it tried to allocate 68719476736 bytes\)"):
        run("SvareVARSampler", **sample_args(tiny_pipeline))

    def other(*a, **k):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(sampler, "generate", other)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        run("SvareVARSampler", **sample_args(tiny_pipeline))


def test_the_core_never_imports_comfy():
    import ast
    from _pack import ROOT
    for path in (ROOT / "svare_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("comfy", "folder_paths") for n in names), path
