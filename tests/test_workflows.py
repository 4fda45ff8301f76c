"""The shipped UI-format workflows (example_workflows/*.json) against the node definitions: node types, links and
their types, widget values (order, ranges, lists, seed controls), required inputs connected."""
from __future__ import annotations

import json

import pytest
from _pack import ROOT, load_pack

pack = load_pack()
M = pack.NODE_CLASS_MAPPINGS
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
# Core ComfyUI nodes the workflows may use: inputs (name -> type, in widget order) and output types.
CORE = {
    "SaveImage": ({"images": ("IMAGE", {}), "filename_prefix": ("STRING", {})}, []),
    "PreviewImage": ({"images": ("IMAGE", {})}, []),
    "PreviewAny": ({"source": ("*", {})}, []),            # shows a STRING (reports); its widget is not saved
    "Note": ({"text": ("STRING", {})}, []),
    "MarkdownNote": ({"text": ("STRING", {})}, []),
}
VIRTUAL = ("Note", "MarkdownNote")
FILE_LISTS = {("SvareLoadErasurePatch", "patch_name")}   # depend on the files present; checked separately


def spec(kind: str):
    if kind in M:
        s = M[kind].INPUT_TYPES()
        return {**s["required"], **s.get("optional", {})}, set(s["required"]), list(M[kind].RETURN_TYPES)
    inputs, outputs = CORE[kind]
    return inputs, set(inputs), outputs


def is_widget(t) -> bool:
    return isinstance(t, list) or t in WIDGET_TYPES


def load(path):
    wf = json.loads(path.read_text())
    return wf, {n["id"]: n for n in wf["nodes"]}


def test_the_five_workflows_are_shipped():
    assert {p.stem for p in WORKFLOWS} >= {"Erase style and compare", "Load patch and generate",
                                           "Multi-concept erasure", "Safety check", "Erase with Switti (VQ toy model)"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_structure_and_links(path):
    wf, nodes = load(path)
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"} <= set(wf)
    assert wf["last_node_id"] >= max(nodes) and len(nodes) == len(wf["nodes"])
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    assert any(n["type"] in VIRTUAL for n in nodes.values()), "every workflow explains itself in a Note"
    assert any(n["type"] in ("SaveImage", "PreviewImage") for n in nodes.values())
    for n in nodes.values():
        assert n["type"] in M or n["type"] in CORE, f"unknown node type {n['type']}"
    for lid, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        _, _, out_types = spec(nodes[src]["type"])
        inputs, _, _ = spec(nodes[dst]["type"])
        assert out["type"] == ltype == out_types[src_slot], f"link {lid}: {ltype} from a {out_types[src_slot]} output"
        assert inp["name"] in inputs and not is_widget(inputs[inp["name"]][0]), f"link {lid} into {inp['name']}"
        assert inputs[inp["name"]][0] in (ltype, "*"), f"link {lid}: {ltype} into {inp['name']} ({inputs[inp['name']][0]})"
        assert inp["link"] == lid and lid in out["links"]
    linked = {(link[3], link[4]) for link in wf["links"]}
    for n in nodes.values():
        for i, inp in enumerate(n.get("inputs", [])):
            assert (inp["link"] is None) or (n["id"], i) in linked


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_required_inputs_connected_and_widgets_valid(path):
    _, nodes = load(path)
    for n in nodes.values():
        kind = n["type"]
        inputs, required, _ = spec(kind)
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name in required:
            if not is_widget(inputs[name][0]):
                assert name in linked, f"{path.name}: {kind} #{n['id']}: required input {name} is not connected"
        if kind == "PreviewAny":
            continue
        values = list(n.get("widgets_values", []))
        expected = []
        for name, (t, *opts) in inputs.items():
            if is_widget(t):
                expected.append((name, t, opts[0] if opts else {}))
                if name == "seed":
                    expected.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"], {}))
        assert len(values) == len(expected), f"{path.name}: {kind} #{n['id']}: {len(values)} widget values, " \
                                             f"expected {[e[0] for e in expected]}"
        for value, (name, t, opts) in zip(values, expected):
            where = f"{path.name}: {kind} #{n['id']}.{name} = {value!r}"
            if name == "control_after_generate":
                assert value == "fixed", f"{where}: ship fixed seeds"
            elif isinstance(t, list):
                assert isinstance(value, str), where
                if (kind, name) not in FILE_LISTS:
                    assert value in t, f"{where} not in {t}"
            elif t == "BOOLEAN":
                assert isinstance(value, bool), where
            elif t == "STRING":
                assert isinstance(value, str), where
            else:
                assert isinstance(value, int if t == "INT" else (int, float)) and not isinstance(value, bool), where
                assert opts.get("min", value) <= value <= opts.get("max", value), f"{where} out of range"


def widgets(node) -> dict:
    """A node's widget values by name (the seed's control_after_generate value skipped)."""
    names = []
    for k, (t, *_) in spec(node["type"])[0].items():
        if is_widget(t):
            names += [k, "control_after_generate"] if k == "seed" else [k]
    return dict(zip(names, node.get("widgets_values", [])))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_runs_on_the_toy_model_in_minutes(path):
    _, nodes = load(path)
    for n in nodes.values():
        w = widgets(n)
        if n["type"] == "SvareLoadVAR":
            assert w["transformer"] in ("toyworld (bundled)", "toyworld_vq (bundled)")
        if n["type"] == "SvareEraseConcept":
            concepts = [c for c in w["concept"].split(",") if c.strip()]
            assert 0 < w["steps"] <= 200 * len(concepts), "the toy model's budget: 200 steps per concept"
            assert w["kind"] == "toy"


def test_shipped_example_patch_exists():
    """'Load patch and generate' loads a patch shipped with the pack (Load Erasure Patch lists those)."""
    _, nodes = load(ROOT / "example_workflows" / "Load patch and generate.json")
    (name,) = [n["widgets_values"][0] for n in nodes.values() if n["type"] == "SvareLoadErasurePatch"]
    assert name.endswith(".safetensors") and "/" not in name
    shipped = [d / name for d in pack.nodes.comfy_adapter.BUNDLED_PATCH_DIRS]
    assert any(p.is_file() for p in shipped), f"the example patch {name} is missing from {shipped[0].parent}"


def test_shipped_example_patch_applies_to_the_bundled_model():
    """The example patch names the bundled model's fingerprint: it applies without force."""
    from svare_core import load_pipeline
    from svare_core.erasure import ErasurePatch, apply_patch

    patch = ErasurePatch.load(ROOT / "svare_core" / "toyworld" / "patches" / "toyworld_striped.safetensors")
    pipe = load_pipeline("toyworld")
    assert patch.base_fingerprint == pipe.base_fingerprint
    patched = apply_patch(pipe, patch)
    assert patched.fingerprint() != pipe.fingerprint()
