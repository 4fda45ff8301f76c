"""Integration test: the pack's models under a REAL ComfyUI's model management (comfy.model_management).

Skipped unless SVARE_COMFYUI_DIR and SVARE_COMFYUI_PYTHON are set (see test_comfyui_server.py and
docs/comfyui-integration.md, "Memory"). The server runs with --cpu. Besides this pack it loads a
small probe pack written into a temp folder, which

- defines a node that loads a "foreign" model (a plain torch module, as another pack would) through
  comfy.model_patcher.ModelPatcher + model_management.load_models_gpu;
- records every load_models_gpu / free_memory call (wrapping them, then calling ComfyUI's own);
- serves GET /svare_probe/state (current_loaded_models: class, devices, loaded bytes; the recorded
  calls; how many svare pipelines and cached detectors are alive) and POST /svare_probe/free
  (model_management.free_memory on the CPU for more than the free RAM, keeping the foreign model:
  what a GPU load of the foreign model does to other models when the GPU is full).

What a --cpu server cannot show: that loading the pack's models offloads the foreign one by itself.
ComfyUI 0.3.64's load_models_gpu frees memory only on devices other than the CPU
(``if device != torch.device("cpu"): free_memory(...)``), and the pack's free-room-before-loading
skips the CPU the same way; offloading a CPU model to the CPU would free nothing anyway. So this test
checks what can be seen: registration, the calls and their memory_required, that ComfyUI's own
free_memory evicts the pack's models (and they come back on the next run), and that /free unloads
them, drops the pack's caches and lets the pipelines be freed.
"""
from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

COMFY_DIR = os.environ.get("SVARE_COMFYUI_DIR", "")
COMFY_PY = os.environ.get("SVARE_COMFYUI_PYTHON", "")
RUN_TIMEOUT = float(os.environ.get("SVARE_COMFYUI_WORKFLOW_TIMEOUT", "600"))

if not (COMFY_DIR and COMFY_PY):
    pytest.skip("real-ComfyUI memory test: set SVARE_COMFYUI_DIR and SVARE_COMFYUI_PYTHON; see "
                "docs/comfyui-integration.md", allow_module_level=True)

from test_comfyui_server import ComfyServer, running_comfyui  # noqa: E402  (after the skip: it checks the env too)

PROBE = textwrap.dedent('''
    """Test probe: a foreign model under ComfyUI's model management, and a view of its state."""
    import gc
    import sys

    import psutil
    import torch
    from aiohttp import web

    import comfy.model_management as mm
    import comfy.model_patcher as mp
    from server import PromptServer

    CALLS = []
    _load, _free = mm.load_models_gpu, mm.free_memory


    def _name(patcher):
        return type(getattr(patcher, "model", None)).__name__


    def load_models_gpu(models, memory_required=0, *args, **kwargs):
        CALLS.append({"fn": "load_models_gpu", "models": sorted(_name(m) for m in models),
                      "memory_required": int(memory_required),
                      "force_full_load": bool(kwargs.get("force_full_load", False)),
                      "inference_mode": torch.is_inference_mode_enabled()})
        return _load(models, memory_required, *args, **kwargs)


    def free_memory(memory_required, device, keep_loaded=[]):
        CALLS.append({"fn": "free_memory", "memory_required": float(memory_required), "device": str(device)})
        return _free(memory_required, device, keep_loaded)


    mm.load_models_gpu, mm.free_memory = load_models_gpu, free_memory


    class ProbeForeignModel(torch.nn.Module):
        """What another pack loads: 16 MB of weights."""
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2048, 2048), requires_grad=False)


    FOREIGN = []


    class ProbeLoadForeign:
        CATEGORY = "svare_probe"
        RETURN_TYPES = ()
        FUNCTION = "load"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"tag": ("INT", {"default": 0})}}

        def load(self, tag):
            if not FOREIGN:
                FOREIGN.append(mp.ModelPatcher(ProbeForeignModel(), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device()))
            mm.load_models_gpu([FOREIGN[0]])
            return {"ui": {"text": ["foreign loaded"]}, "result": ()}


    NODE_CLASS_MAPPINGS = {"ProbeLoadForeign": ProbeLoadForeign}


    def _state():
        gc.collect()
        loaded = []
        for lm in mm.current_loaded_models:
            p = lm.model
            if p is None:
                continue
            inner = getattr(p.model, "inner", None)
            loaded.append({"class": type(p.model).__name__,
                           "inner": type(inner).__name__ if inner is not None else None,
                           "load_device": str(p.load_device), "offload_device": str(p.offload_device),
                           "device": str(p.current_loaded_device()), "size": int(p.model_size()),
                           "loaded": int(p.loaded_size()), "currently_used": bool(lm.currently_used)})
        core = sys.modules.get("svare_core.loader")
        registry = sys.modules.get("svare_core.safety.registry")
        return {"loaded": loaded, "calls": CALLS,
                "pipelines_alive": len(core.load_pipeline_cached) if core else None,
                "detectors_cached": registry.cached_detectors() if registry else None,
                "ram_free": psutil.virtual_memory().available}


    @PromptServer.instance.routes.get("/svare_probe/state")
    async def state(request):
        return web.json_response(_state())


    @PromptServer.instance.routes.post("/svare_probe/free")
    async def free(request):
        keep = [lm for lm in mm.current_loaded_models if FOREIGN and lm.model is FOREIGN[0]]
        gone = mm.free_memory(psutil.virtual_memory().available + 2**30, mm.get_torch_device(), keep_loaded=keep)
        return web.json_response({"unloaded": sorted(type(lm.model.model).__name__ for lm in gone
                                                     if lm.model is not None)})
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfyui_memory")
    (tmp / "svare_memory_probe").mkdir()
    (tmp / "svare_memory_probe" / "__init__.py").write_text(PROBE)
    keep = os.environ.get("SVARE_COMFYUI_MEMORY_LOG")
    with running_comfyui(tmp, packs={"svare_memory_probe": tmp / "svare_memory_probe"},
                         args=("--verbose", "DEBUG"), ready="/svare_probe/state",
                         keep_log=Path(keep) if keep else None) as srv:
        yield srv


def _queue(server: ComfyServer, prompt: dict) -> dict:
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "svare-memory-test"})
    assert status == 200 and not body.get("node_errors"), body
    pid = body["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        status, hist = server.get(f"/history/{pid}")
        entry = hist.get(pid) if status == 200 and isinstance(hist, dict) else None
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            assert entry["status"]["status_str"] == "success", \
                f"{json.dumps(entry['status'], indent=1)[:4000]}\n{server.log_tail()}"
            return entry
        if server.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"prompt {pid} did not finish\n{server.log_tail()}", pytrace=False)
        time.sleep(0.5)


def _state(server: ComfyServer) -> dict:
    status, body = server.get("/svare_probe/state")
    assert status == 200, body
    return body


def _classes(state: dict) -> list[str]:
    return sorted(m["class"] for m in state["loaded"])


SVARE = ["SvareTextEncoder", "SvareTransformer", "SvareVAE"]


def _inputs(server: ComfyServer, node: str, **values) -> dict:
    """Every widget of ``node`` at the default the server lists, then ``values`` (links or widgets)."""
    info = server.object_info[node]["input"]
    out = {}
    for name, spec in {**(info.get("required") or {}), **(info.get("optional") or {})}.items():
        kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(kind, list) and kind:
            out[name] = kind[0]
    out.update(values)
    return {"class_type": node, "inputs": out}


def _svare_prompt(server: ComfyServer, seed: int) -> dict:
    return {
        "1": _inputs(server, "SvareLoadVAR", transformer="toyworld (bundled)", device="auto"),
        "2": _inputs(server, "SvareVARSampler", model=["1", 0], seed=seed, batch_size=2),
        "3": _inputs(server, "SvareSafetyScore", images=["2", 0], detector="toyworld", concept="red"),
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def _erasure_prompt(server: ComfyServer) -> dict:
    return {
        "1": _inputs(server, "SvareLoadVAR", transformer="toyworld (bundled)", device="auto"),
        "5": _inputs(server, "SvareEraseConcept", model=["1", 0], steps=2),
        "6": _inputs(server, "SvareApplyErasurePatch", model=["1", 0], patch=["5", 0]),
        "7": _inputs(server, "SvareVARSampler", model=["6", 0], seed=3),
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }


def test_memory_under_comfyui_model_management(server):
    assert _classes(_state(server)) == []

    # A foreign model, registered the way any pack does.
    _queue(server, {"1": {"class_type": "ProbeLoadForeign", "inputs": {"tag": 1}}})
    state = _state(server)
    assert _classes(state) == ["ProbeForeignModel"]
    n_calls = len(state["calls"])

    # The pack's Load VAR + VAR Sampler (+ Safety Score, which fills the detector cache).
    _queue(server, _svare_prompt(server, seed=1))
    state = _state(server)
    calls = state["calls"][n_calls:]
    loads = [c for c in calls if c["fn"] == "load_models_gpu"]
    ours = [c for c in loads if set(SVARE) <= set(c["models"])]
    # Load VAR registers the three parts at once (no working memory), the sampler loads them again with
    # its estimate (KV cache etc. for 2 images), whole and outside inference mode.
    assert len(ours) >= 2, json.dumps(calls, indent=1)
    assert ours[0]["memory_required"] == 0 and ours[1]["memory_required"] > 0, ours
    assert all(c["force_full_load"] and not c["inference_mode"] for c in ours), ours
    loaded = {m["class"]: m for m in state["loaded"]}
    for name in SVARE:
        m = loaded[name]
        assert m["load_device"] == "cpu" and m["device"] == "cpu" and m["loaded"] == m["size"] > 0, m
    assert "SvareCaches" in loaded and state["detectors_cached"] == 1
    assert state["pipelines_alive"] == 1
    # On --cpu nothing offloads the foreign model: load_models_gpu and the pack skip the CPU (see the
    # module docstring). It is still registered and loaded.
    assert "ProbeForeignModel" in loaded
    assert not [c for c in calls if c["fn"] == "free_memory" and c["device"] != "cpu"]

    # ComfyUI's own free_memory (what a GPU load of the foreign model runs when the GPU is full)
    # evicts the pack's models and keeps the one being loaded.
    status, body = server.post("/svare_probe/free", {})
    assert status == 200 and set(SVARE) <= set(body["unloaded"]), body
    state = _state(server)
    assert _classes(state) == ["ProbeForeignModel"], state["loaded"]
    assert state["detectors_cached"] == 0, "unloading the cache entry drops the cached detectors"

    # The next run loads them back (the node outputs are cached, so only the sampler runs again).
    n_calls = len(state["calls"])
    _queue(server, _svare_prompt(server, seed=2))
    state = _state(server)
    assert set(SVARE) <= set(_classes(state))
    assert any(set(SVARE) <= set(c["models"]) and c["memory_required"] > 0
               for c in state["calls"][n_calls:] if c["fn"] == "load_models_gpu")

    # Erase Concept frees room for training (its own estimate), drawing its targets places nothing again;
    # the patched model is a second transformer sharing the VAE's and text encoder's patchers.
    n_calls = len(state["calls"])
    _queue(server, _erasure_prompt(server))
    state = _state(server)
    loads = [c for c in state["calls"][n_calls:] if c["fn"] == "load_models_gpu" and set(SVARE) <= set(c["models"])]
    assert len(loads) == 2 and all(c["memory_required"] > 0 and c["force_full_load"] for c in loads), loads
    assert loads[0]["memory_required"] != loads[1]["memory_required"]       # training, then sampling
    classes = _classes(state)
    assert classes.count("SvareTransformer") == 2 and classes.count("SvareVAE") == 1, classes
    assert classes.count("SvareTextEncoder") == 1 and "ProbeForeignModel" in classes, classes

    # /free: ComfyUI unloads every model and drops its node outputs; nothing of the pack stays alive.
    status, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 60
    while True:
        state = _state(server)
        if not state["loaded"] and state["pipelines_alive"] == 0 and state["detectors_cached"] == 0:
            break
        assert time.monotonic() < deadline, f"after /free: {json.dumps(state, indent=1)[:3000]}"
        time.sleep(0.5)
