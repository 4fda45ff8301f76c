"""The seams of the engine: plug-ins, model families and the one settings resolver, method objects,
and the rule that generic code never imports the toy world."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from svare_core import plugins
from svare_core.erasure import METHODS, EraseConfig, build_pairs, erase, expand_concept
from svare_core.erasure.config import METHOD_NAMES, RESEARCH_OPTIONS, USER_OPTIONS
from svare_core.erasure.methods import ErasureMethod
from svare_core.erasure.pairs import PairKind, PromptPair, pair_kinds
from svare_core.sampling import SamplerSettings
from svare_core.settings import INFINITY, Family, family_of, resolve_erase, resolve_sampler
from svare_core.toyworld.plugin import TOYWORLD

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def test_generic_code_never_imports_the_toy_world():
    # The CLI's demo command runs the toy world's main job; everything else reaches it through the registry.
    allowed = {ROOT / "svare_core" / "__main__.py"}
    files = [p for p in (ROOT / "svare_core").rglob("*.py") if "toyworld" not in p.parts and p not in allowed]
    files += list((ROOT / "nodes").rglob("*.py"))
    assert len(files) > 30
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if "toyworld" in m.split("."))
                 for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_toy_world_registers_as_a_plug_in():
    assert plugins.get("family", "toyworld") is TOYWORLD
    assert Path(plugins.get("bundled_model", "toyworld")).is_file()
    assert "toy" in pair_kinds() and plugins.get("evaluation", "toyworld") is not None
    from svare_core.safety import detector_names
    assert "toyworld" in detector_names()


@pytest.fixture()
def second_family(monkeypatch):
    """A made-up family registered the way a plug-in does: its defaults and a pair kind of its own."""
    registry = plugins.registry()
    fam = Family("pixelart", "a made-up second family", sampler=SamplerSettings(cfg=2.0, tau=0.8),
                 erase=EraseConfig(steps=30, lr=5e-4, trainable="xattn", preserve_per_step=2), pair_kind="pixel")
    kind = PairKind("pixel", lambda c, a: [PromptPair(f"{c} sprite", f"{a} sprite", c),
                                           PromptPair(f"a {c} tile", f"a {a} tile", c)],
                    preserve_prompts=lambda c: ["a grass tile"])
    monkeypatch.setitem(registry._items["family"], fam.name, fam)
    monkeypatch.setitem(registry._items["pair_kind"], kind.name, kind)
    return fam


def test_a_second_family_plugs_in_the_same_way(second_family, tiny_pipeline):
    from dataclasses import replace

    from svare_core.erasure.pairs import preserve_prompts_for

    pipe = replace(tiny_pipeline, family="pixelart")
    assert family_of(pipe) is second_family
    assert "pixel" in pair_kinds()
    pairs = build_pairs("knight", "wizard", family_of(pipe).pair_kind)
    assert [p.unsafe for p in pairs] == ["knight sprite", "a knight tile"]
    assert preserve_prompts_for(pairs, "pixel") == ["a grass tile"]
    assert resolve_sampler(pipe).cfg == 2.0 and resolve_sampler(pipe, cfg=5.0).cfg == 5.0
    cfg = resolve_erase(pipe, pairs)
    assert (cfg.steps, cfg.lr, cfg.trainable, cfg.preserve_per_step) == (30, 5e-4, "xattn", 2)
    result = erase(pipe, pairs, resolve_erase(pipe, pairs, steps=1), preserve_prompts=["a grass tile"])
    assert result.patch.concepts == ["knight"] and result.patch.meta["hyperparameters"]["trainable"] == "xattn"


def test_unknown_family_is_refused_by_name(tiny_pipeline):
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"unknown model family 'nosuch'.*plug-in"):
        resolve_erase(replace(tiny_pipeline, family="nosuch"))


def test_families_are_what_the_model_file_says(tiny_pipeline):
    from svare_core import load_pipeline

    assert tiny_pipeline.family == "infinity" and family_of(tiny_pipeline) is INFINITY
    toy = load_pipeline("toyworld")
    assert toy.family == "toyworld" and family_of(toy) is TOYWORLD


@pytest.mark.parametrize("family", [INFINITY, TOYWORLD])
def test_one_resolver_scales_the_budget_per_concept(family):
    one, three = build_pairs("red", "blue", "toy"), build_pairs("red, star, striped", "blue, circle, solid", "toy")
    base = family.erase
    assert resolve_erase(family, one).steps == base.steps
    assert resolve_erase(family, three).steps == 3 * base.steps
    assert resolve_erase(family, three).preserve_per_step == 3 * base.preserve_per_step
    given = resolve_erase(family, three, steps=7, preserve_per_step=2, lr=None)
    assert (given.steps, given.preserve_per_step, given.lr) == (7, 6, base.lr)      # None: unset
    knob = resolve_erase(family, one, supervised_scales="first", preserve_cfg=1.0)
    assert knob.research.supervised_scales == "first" and knob.research.preserve_cfg == 1.0
    assert family.erase.research.supervised_scales == "all", "resolving must not change the family's defaults"
    with pytest.raises(ValueError, match="unknown erasure setting"):
        resolve_erase(family, one, learning_rate=1e-3)


def test_user_facing_config_keeps_ablation_knobs_apart():
    assert "research" not in USER_OPTIONS and not set(USER_OPTIONS) & set(RESEARCH_OPTIONS)
    for knob in ("supervised_scales", "preserve_cfg", "bit_threshold", "esd_eta", "betas", "grad_clip"):
        assert knob in RESEARCH_OPTIONS
    options = EraseConfig().options()
    assert set(options) == set(USER_OPTIONS) - {"cache_dir"} | set(RESEARCH_OPTIONS)
    # A default run does not use the robust attack's knobs, so its patch and cached targets leave them out.
    used = EraseConfig().used_options()
    assert set(options) - set(used) == {k for k in RESEARCH_OPTIONS if k.startswith("adversarial_")}
    assert EraseConfig(robust=True).used_options() == EraseConfig(robust=True).options()


def test_each_method_is_a_class_with_one_step():
    assert tuple(METHODS) == METHOD_NAMES
    for name, cls in METHODS.items():
        assert issubclass(cls, ErasureMethod) and cls.name == name
        assert "step" in vars(cls), f"{name} must define its own iteration"


def test_toy_pairs_come_from_the_plug_in():
    from svare_core.toyworld.pairs import toy_pairs

    assert expand_concept("red", "blue", "toy") == toy_pairs("red", "blue")
