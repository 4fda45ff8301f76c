"""Integration test: the svare node pack inside a REAL ComfyUI server and its real web frontend.

Skipped unless both are set:
  SVARE_COMFYUI_DIR     a checkout of Comfy-Org/ComfyUI (the folder holding main.py)
  SVARE_COMFYUI_PYTHON  the python of a venv able to run it (torch, torchvision, ComfyUI's
                        requirements, the pack's requirements)
The UI tests also need node + playwright-core + a system Chromium (see ui_driver.mjs):
  SVARE_PLAYWRIGHT      path of the playwright-core package folder (or set NODE_PATH)
  SVARE_CHROMIUM        Chromium binary (default /usr/bin/chromium)
  SVARE_NODE            node binary (default: `node` on PATH)
Optional:
  SVARE_SCREENSHOT_DIR  keep one screenshot per workflow there (after load and after the run)
  SVARE_COMFYUI_WORKFLOW_TIMEOUT  seconds allowed per workflow run (default 600)
  SVARE_COMFYUI_PACK_DIR          pack to load (default: this repository's root)
  SVARE_COMFYUI_PACK_NAME         folder name the pack is loaded under (default "svare")
  SVARE_COMFYUI_EXPECTED_NODES    JSON list of node class names (default expected_nodes.json here)

Everything the server writes (input/output/temp/user, database, log) goes to a pytest temp dir.
See docs/comfyui-integration.md.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DRIVER = HERE / "ui_driver.mjs"

COMFY_DIR = os.environ.get("SVARE_COMFYUI_DIR", "")
COMFY_PY = os.environ.get("SVARE_COMFYUI_PYTHON", "")
PACK_DIR = Path(os.environ.get("SVARE_COMFYUI_PACK_DIR") or REPO_ROOT).resolve()
PACK_NAME = os.environ.get("SVARE_COMFYUI_PACK_NAME", "svare")
PACK_MODULE = f"custom_nodes.{PACK_NAME}"
EXPECTED_NODES_FILE = Path(os.environ.get("SVARE_COMFYUI_EXPECTED_NODES") or HERE / "expected_nodes.json")
WORKFLOW_TIMEOUT = float(os.environ.get("SVARE_COMFYUI_WORKFLOW_TIMEOUT", "600"))
STARTUP_TIMEOUT = float(os.environ.get("SVARE_COMFYUI_STARTUP_TIMEOUT", "300"))

if not (COMFY_DIR and COMFY_PY):
    pytest.skip(
        "real-ComfyUI integration test: set SVARE_COMFYUI_DIR (a ComfyUI checkout) and "
        "SVARE_COMFYUI_PYTHON (python of a venv that runs it); see docs/comfyui-integration.md",
        allow_module_level=True,
    )
if not (Path(COMFY_DIR) / "main.py").is_file():
    pytest.fail(f"SVARE_COMFYUI_DIR={COMFY_DIR!r} has no main.py", pytrace=False)
if not (Path(COMFY_PY).is_file() and os.access(COMFY_PY, os.X_OK)):
    pytest.fail(f"SVARE_COMFYUI_PYTHON={COMFY_PY!r} is not an executable", pytrace=False)

WORKFLOW_DIR = PACK_DIR / "example_workflows"   # the folder ComfyUI lists as a pack's templates


def _workflow_files() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def _slug(name: str) -> str:
    """'Multi-concept erasure' -> 'multi_concept_erasure' (screenshot file names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _expected_nodes() -> list[str] | None:
    """Node class names from expected_nodes.json: a list, or {"nodes": [...]}; None if absent."""
    if not EXPECTED_NODES_FILE.is_file():
        return None
    data = json.loads(EXPECTED_NODES_FILE.read_text())
    if isinstance(data, dict):
        data = data.get("nodes", data.get("NODE_CLASS_MAPPINGS", []))
    return sorted(data)


# --------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30):
    """Returns (status, parsed JSON or text). Loopback only."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


class ComfyServer:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, base: Path, parent: Path):
        self.url, self.proc, self.log, self.base, self.parent = url, proc, log, base, parent
        self._object_info = None

    def get(self, path: str, timeout: float = 30):
        return _http("GET", self.url + path, timeout=timeout)

    def post(self, path: str, body: dict, timeout: float = 60):
        return _http("POST", self.url + path, body, timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    @property
    def object_info(self) -> dict:
        if self._object_info is None:
            status, info = self.get("/object_info", timeout=120)
            assert status == 200, f"GET /object_info -> {status}: {info!r:.500}"
            self._object_info = info
        return self._object_info

    def pack_nodes(self) -> dict:
        return {k: v for k, v in self.object_info.items()
                if v.get("python_module", "") == PACK_MODULE
                or v.get("python_module", "").startswith(PACK_MODULE + ".")}


@contextlib.contextmanager
def running_comfyui(tmp: Path, *, packs: dict[str, Path] | None = None, python: list[str] | None = None,
                    env: dict[str, str] | None = None, args: tuple[str, ...] = (), ready: str = "/system_stats",
                    keep_log: Path | None = None):
    """A ComfyUI server (--cpu, loopback, everything it writes under ``tmp``) with this pack and ``packs``
    (folder name -> folder) as custom nodes; yields a ComfyServer once ``ready`` answers 200.
    ``python``: the interpreter command (default SVARE_COMFYUI_PYTHON); ``env``: variables to set."""
    base = tmp / "base"
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir(parents=True)
    parent = tmp / "custom_parent"
    parent.mkdir()
    for name, folder in {PACK_NAME: PACK_DIR, **(packs or {})}.items():
        (parent / name).symlink_to(folder, target_is_directory=True)
    extra = tmp / "extra_model_paths.yaml"
    extra.write_text(f"svare_test:\n  custom_nodes: {parent}\n")
    port = _free_port()
    log = tmp / "comfyui.log"
    cmd = [*(python or [COMFY_PY]), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--extra-model-paths-config", str(extra),
           "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
           "--disable-auto-launch", "--log-stdout", *args]
    full_env = dict(os.environ)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.pop("PYTHONPATH", None)  # the pack must load through ComfyUI's loader, not our path
    full_env.update(env or {})
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=COMFY_DIR, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    srv = ComfyServer(f"http://127.0.0.1:{port}", proc, log, base, parent)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} during startup:\n{srv.log_tail()}",
                            pytrace=False)
            try:
                status, _ = srv.get(ready, timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT:.0f}s:\n{srv.log_tail()}",
                            pytrace=False)
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if keep_log is not None:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep_log)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shots = os.environ.get("SVARE_SCREENSHOT_DIR")
    with running_comfyui(tmp_path_factory.mktemp("comfyui"),
                         keep_log=Path(shots) / "comfyui.log" if shots else None) as srv:
        yield srv


# --------------------------------------------------------------------------- UI driver
@pytest.fixture(scope="module")
def ui_driver():
    node = os.environ.get("SVARE_NODE") or shutil.which("node")
    if not node:
        pytest.skip("UI tests need node (set SVARE_NODE or put node on PATH)")
    try:
        r = subprocess.run([node, str(DRIVER), "--check"], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ))
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        pytest.skip(f"UI driver self-check failed ({e}); see docs/comfyui-integration.md")
    if not info.get("ok"):
        pytest.skip(f"UI tests need playwright-core (SVARE_PLAYWRIGHT or NODE_PATH) and Chromium "
                    f"(SVARE_CHROMIUM): {info.get('error')}")

    def run(url: str, workflow: Path | None, screenshot: Path | None, *, wait: float = 0, queue: bool = True,
            templates: str | None = None, new_nodes: list[str] | None = None,
            cancel: tuple[str, int] | None = None):
        args = [node, str(DRIVER), url, str(workflow), str(screenshot or "")]
        if templates is not None:             # the template browser, for the pack named `templates`
            args = [node, str(DRIVER), url, "--templates", templates, str(screenshot or "")]
        if new_nodes is not None:             # nodes added to an empty graph, as from the node library
            args = [node, str(DRIVER), url, "--new-nodes", ",".join(new_nodes)]
        if cancel is not None:                # (node id, training steps): Cancel during the first phase
            args = [node, str(DRIVER), url, "--cancel", str(workflow), str(cancel[0]), str(cancel[1])]
        if wait:
            args += ["--wait", str(int(wait))]
        if not queue:
            args.append("--no-queue")
        r = subprocess.run(args, capture_output=True, text=True, timeout=wait + 300,
                           env=dict(os.environ))
        lines = r.stdout.strip().splitlines()
        assert lines, f"ui_driver printed nothing (rc={r.returncode}); stderr:\n{r.stderr[-3000:]}"
        out = json.loads(lines[-1])
        out["_stderr"] = r.stderr[-3000:]
        return out

    return run


def _screenshot_path(name: str) -> Path | None:
    d = os.environ.get("SVARE_SCREENSHOT_DIR")
    if not d:
        return None
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d) / f"{name}.png"


_WORKFLOWS = _workflow_files()
_WF_PARAMS = [pytest.param(p, id=p.stem) for p in _WORKFLOWS] or [
    pytest.param(None, id="no-workflows",
                 marks=pytest.mark.skip(reason=f"no workflows in {WORKFLOW_DIR}"))]


# --------------------------------------------------------------------------- tests
def test_pack_imports_without_error(server):
    log = server.log_text()
    bad = [ln for ln in log.splitlines()
           if ("IMPORT FAILED" in ln or "Cannot import" in ln) and str(server.parent) in ln]
    assert not bad, "ComfyUI failed to import the pack:\n" + "\n".join(bad) + "\n" + server.log_tail()
    assert server.pack_nodes(), (
        f"/object_info has no node whose python_module is {PACK_MODULE!r}\n{server.log_tail()}")


def test_object_info_lists_expected_nodes(server):
    served = server.pack_nodes()
    expected = _expected_nodes()
    if expected is None:
        pytest.skip(f"{EXPECTED_NODES_FILE} absent; pack serves: {sorted(served)}")
    missing = [n for n in expected if n not in server.object_info]
    assert not missing, f"not in /object_info: {missing}\n{server.log_tail()}"
    foreign = {n: server.object_info[n]["python_module"] for n in expected
               if n not in served}
    assert not foreign, f"served by another module, not {PACK_MODULE}: {foreign}"
    unlisted = sorted(set(served) - set(expected))
    assert not unlisted, f"the pack serves nodes missing from {EXPECTED_NODES_FILE.name}: {unlisted}"


def test_pack_node_definitions_are_complete(server):
    for name, info in server.pack_nodes().items():
        assert info.get("category"), f"{name}: empty CATEGORY"
        assert info.get("display_name"), f"{name}: no display name"
        assert len(info.get("output", [])) == len(info.get("output_name", [])), name
        for section in ("required", "optional"):
            for inp, spec in (info.get("input", {}).get(section) or {}).items():
                assert isinstance(spec, list) and spec, f"{name}.{inp}: malformed input spec {spec!r}"


def test_workflows_listed_as_templates(server):
    if not _WORKFLOWS:
        pytest.skip(f"no workflows in {WORKFLOW_DIR}")
    status, templates = server.get("/api/workflow_templates")
    assert status == 200
    assert sorted(templates.get(PACK_NAME, [])) == sorted(p.stem for p in _WORKFLOWS), templates
    debug_hint = [ln for ln in server.log_text().splitlines() if "consider renaming it to 'example_workflows'" in ln
                  and PACK_NAME in ln]
    assert not debug_hint, debug_hint


def _get_bytes(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


@pytest.mark.parametrize("workflow", _WF_PARAMS)
def test_template_and_thumbnail_are_served(server, workflow):
    """What the template browser fetches (frontend 1.27.10, useTemplateWorkflows.ts): the workflow at
    api.apiURL(`/workflow_templates/${module}/${name}.json`) and its card's thumbnail at
    `/workflow_templates/${module}/${name}.jpg` (mediaType image, mediaSubtype jpg for custom nodes)."""
    base = f"{server.url}/api/workflow_templates/{urllib.parse.quote(PACK_NAME)}/{urllib.parse.quote(workflow.stem)}"
    status, ctype, body = _get_bytes(base + ".json")
    assert status == 200 and json.loads(body) == json.loads(workflow.read_text()), (status, body[:200])
    status, ctype, body = _get_bytes(base + ".jpg")
    assert status == 200, f"GET {base}.jpg -> {status}"
    assert ctype.startswith("image/jpeg") and body.startswith(b"\xff\xd8\xff"), (ctype, body[:8])
    assert body == workflow.with_suffix(".jpg").read_bytes()


def test_template_browser_shows_every_workflow_with_its_thumbnail(server, ui_driver):
    """The real frontend's template browser (Templates -> svare): a card per workflow, titled with its
    file name, whose thumbnail loaded (no 404, no broken-image icon)."""
    if not _WORKFLOWS:
        pytest.skip(f"no workflows in {WORKFLOW_DIR}")
    res = ui_driver(server.url, None, _screenshot_path("template_browser"), templates=PACK_NAME)
    ctx = json.dumps({k: v for k, v in res.items() if k != "_stderr"}, indent=1)[:6000]
    assert not res.get("error"), ctx
    assert sorted(c["name"] for c in res["cards"]) == sorted(p.stem for p in _WORKFLOWS), ctx
    for card in res["cards"]:
        assert card["title"] == card["name"], ctx
        assert card["loaded"] and not card["error_icon"], f"thumbnail of {card['name']!r} not shown: {ctx}"
    jpgs = [r for r in res["thumbnail_responses"] if r["url"].endswith(".jpg")]
    assert jpgs and all(r["status"] == 200 for r in jpgs), ctx


def _wait_history(server: ComfyServer, prompt_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, hist = server.get(f"/history/{prompt_id}")
        entry = hist.get(prompt_id) if status == 200 and isinstance(hist, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None and \
                entry["status"].get("status_str") in ("success", "error"):
            return entry
        if server.proc.poll() is not None:
            pytest.fail(f"ComfyUI died while running {prompt_id}:\n{server.log_tail()}", pytrace=False)
        if time.monotonic() > deadline:
            server.post("/interrupt", {})
            pytest.fail(f"prompt {prompt_id} not finished after {timeout:.0f}s\n{server.log_tail()}",
                        pytrace=False)
        time.sleep(1)


@pytest.mark.parametrize("workflow", _WF_PARAMS)
def test_workflow_runs_from_the_ui(server, ui_driver, workflow):
    wf = json.loads(workflow.read_text())
    assert isinstance(wf.get("nodes"), list) and "links" in wf, \
        f"{workflow.name} is not a UI-format workflow (needs 'nodes' and 'links')"
    shot = _screenshot_path(_slug(workflow.stem))
    res = ui_driver(server.url, workflow, shot, wait=WORKFLOW_TIMEOUT)
    ctx = json.dumps({k: v for k, v in res.items() if k != "api_prompt"}, indent=1)[:6000]
    assert not res.get("error"), ctx
    assert not res["missing_node_types"], f"node types unknown to the frontend: {ctx}"
    # Uncaught page errors from the pack's own web extensions fail; the frontend's own ones
    # (1.27.10 throws "reading 'id'" while initialising settings of a fresh user) are only reported.
    ext_errors = [e for e in res["page_errors"] if "/extensions/" in e]
    assert not ext_errors, f"uncaught errors in a web extension: {ctx}"
    for e in res["page_errors"]:
        print(f"[frontend page error, not from an extension] {e.splitlines()[0]}")
    # The UI must read the widget values exactly as the file states them (a missing or extra
    # entry, e.g. a forgotten "control_after_generate" after a seed, shifts every later value).
    for node in wf["nodes"]:
        if "widgets_values" in node:
            got = res["widgets_values"].get(str(node["id"]))
            assert got == node["widgets_values"], (
                f"{workflow.name}: node {node['id']} ({node['type']}) widgets_values in the file "
                f"{node['widgets_values']!r} are read by the UI as {got!r}")
    not_fixed = [c for c in res["controls"] if c["value"] != "fixed"]
    assert not not_fixed, f"{workflow.name}: ship seeds with control_after_generate 'fixed': {not_fixed}"
    assert res["status"] == 200 and res["prompt_id"], f"POST /prompt rejected the workflow: {ctx}"
    assert not res["response"].get("node_errors"), ctx

    entry = _wait_history(server, res["prompt_id"], WORKFLOW_TIMEOUT)
    messages = entry["status"].get("messages", [])
    errors = [m for m in messages if m[0] in ("execution_error", "execution_interrupted")]
    assert not errors and entry["status"]["status_str"] == "success", \
        f"{json.dumps(errors, indent=1)[:4000]}\n{server.log_tail()}"

    outputs = entry.get("outputs", {})
    images = [(nid, img) for nid, out in outputs.items() for img in out.get("images", [])]
    assert images, f"no output node produced images; outputs: {json.dumps(outputs)[:2000]}"
    api = res["api_prompt"]
    for nid, node in api.items():  # every image-saving node in the graph produced images
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            assert outputs.get(nid, {}).get("images"), f"{node['class_type']} #{nid} has no images"
    for _, img in images:  # the images really exist and are served
        q = urllib.parse.urlencode({k: img.get(k, "") for k in ("filename", "subfolder", "type")})
        req = urllib.request.urlopen(f"{server.url}/view?{q}", timeout=30)
        head = req.read(8)
        assert req.status == 200 and head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")), \
            f"/view?{q} did not return an image: {head!r}"


def _out_of_range_prompt(server: ComfyServer, api: dict):
    """Copy of `api` with one literal numeric widget of a pack node pushed past its max (or min)."""
    pack = server.pack_nodes()
    for nid, node in api.items():
        info = pack.get(node["class_type"])
        if not info:
            continue
        specs = {**(info["input"].get("required") or {}), **(info["input"].get("optional") or {})}
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if (not spec or spec[0] not in ("INT", "FLOAT") or isinstance(value, list)
                    or len(spec) < 2 or not isinstance(spec[1], dict)):
                continue
            bad = copy.deepcopy(api)
            if spec[1].get("max") is not None:
                bad[nid]["inputs"][name] = spec[1]["max"] + (1 if spec[0] == "INT" else 1.0)
                return bad, nid, name, "value_bigger_than_max"
            if spec[1].get("min") is not None:
                bad[nid]["inputs"][name] = spec[1]["min"] - (1 if spec[0] == "INT" else 1.0)
                return bad, nid, name, "value_smaller_than_min"
    return None


@pytest.mark.parametrize("workflow", _WF_PARAMS)
def test_out_of_range_widget_is_rejected(server, ui_driver, workflow):
    res = ui_driver(server.url, workflow, None, queue=False)
    assert not res.get("error") and res["api_prompt"], res
    found = _out_of_range_prompt(server, res["api_prompt"])
    if found is None:
        pytest.skip(f"{workflow.name}: no pack node with a bounded INT/FLOAT widget value")
    bad, nid, name, err_type = found
    status, body = server.post("/prompt", {"prompt": bad, "client_id": "svare-test"})
    # ComfyUI answers 400 when no output can run, and 200 (still listing node_errors, running
    # nothing of the bad node) when another output branch stays valid.
    assert status in (200, 400), f"unexpected status {status} for {nid}.{name}: {body}"
    node_errors = body.get("node_errors", {})
    assert nid in node_errors, body
    types = [e.get("type") for e in node_errors[nid].get("errors", [])]
    assert err_type in types, body


def test_new_erase_concept_node_starts_with_a_fixed_seed(server, ui_driver):
    """A new Erase Concept node keeps its seed (Run again reuses the trained patch); a new sampler keeps
    the frontend's usual "randomize" (new images on every Run, as KSampler)."""
    res = ui_driver(server.url, None, None, new_nodes=["SvareEraseConcept", "SvareVARSampler"])
    assert not res.get("error") and res["ok"], res
    controls = {n["type"]: n["controls"] for n in res["nodes"]}
    assert controls == {"SvareEraseConcept": ["fixed"], "SvareVARSampler": ["randomize"]}, res
    assert not [e for e in res["page_errors"] if "/extensions/" in e], res["page_errors"]


def _erase_workflow(steps: int | None = None, control: str | None = None) -> tuple[dict, int]:
    """The shipped "Erase style and compare" workflow, optionally with other training steps or seed
    control; also returns the Erase Concept node's id."""
    wf = json.loads((WORKFLOW_DIR / "Erase style and compare.json").read_text())
    (node,) = [n for n in wf["nodes"] if n["type"] == "SvareEraseConcept"]
    values = node["widgets_values"]
    assert isinstance(values[5], int) and values[-1] == "fixed", values  # steps ... seed, control
    if steps is not None:
        values[5] = steps
    if control is not None:
        values[-1] = control
    return wf, node["id"]


def test_a_saved_randomize_seed_is_kept_on_load(server, ui_driver, tmp_path):
    wf, node_id = _erase_workflow(control="randomize")
    path = tmp_path / "randomize.json"
    path.write_text(json.dumps(wf))
    res = ui_driver(server.url, path, None, queue=False)
    assert not res.get("error"), res
    assert [c["value"] for c in res["controls"] if c["node"] == node_id] == ["randomize"], res["controls"]


def test_cancel_during_target_generation_stops_within_a_second(server, ui_driver, tmp_path):
    """Cancel while Erase Concept draws its training targets (its first progress bar, before any
    training step): the frontend hears "execution_interrupted" within 1 s, and the history records
    the interruption."""
    steps = 997  # a total no target count has, to tell the two progress bars apart
    wf, node_id = _erase_workflow(steps=steps)
    path = tmp_path / "cancel.json"
    path.write_text(json.dumps(wf))
    res = ui_driver(server.url, path, None, cancel=(node_id, steps))
    ctx = json.dumps({k: v for k, v in res.items() if k != "_stderr"}, indent=1)[:4000]
    assert not res.get("error"), ctx
    assert res["progress_before"] and all(p["max"] != steps for p in res["progress_before"]), ctx
    assert res["ended_by"] == "execution_interrupted", ctx
    assert res["interrupted_after_ms"] < 1000, ctx
    print(f"Cancel during target generation: interrupted after {res['interrupted_after_ms']:.0f} ms")
    entry = _wait_history(server, res["prompt_id"], 60)
    kinds = [m[0] for m in entry["status"].get("messages", [])]
    assert "execution_interrupted" in kinds, entry["status"]
