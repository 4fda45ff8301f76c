"""The architecture registry: an architecture registered by one call is recognised by its keys, configured
from its shapes, inspected and built like the built-in ones; svare files name the architecture of each part."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from svare_core.models import ModelLoadError, inspect_file, load_transformer, load_vae, registry
from svare_core.models.checkpoint import Checkpoint
from svare_core.models.format import read_metadata, save_model
from svare_core.models.infinity import Infinity
from svare_core.models.registry import Architecture, identify, layout_of
from svare_core.models.vae import BSQVAE
from svare_core.toyworld.plugin import WEIGHTS

from conftest import randomise, tiny_transformer_config, tiny_vae_config


@dataclass
class ToyConfig:
    width: int
    text_dim: int = 4
    bits: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        return cls(**d)


class Toy(torch.nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = torch.nn.Linear(cfg.width, cfg.width)


def toy_layout(ckpt: Checkpoint) -> tuple[ToyConfig, dict[str, str]]:
    # The released files name the layer "toy_proj"; ours is "proj".
    return ToyConfig(width=ckpt.shape("toy_proj.weight")[0]), {"proj.weight": "toy_proj.weight", "proj.bias": "toy_proj.bias"}


TOY = Architecture("toy", "toy transformer (tests)", "transformer", lambda c: c.has("toy_proj.weight", "toy_proj.bias"),
                   toy_layout, Toy, ToyConfig)


@pytest.fixture
def toy(monkeypatch) -> Architecture:
    """TOY registered for one test; the registry is as before afterwards."""
    monkeypatch.setattr(registry, "_architectures", registry.architectures())
    return registry.register(TOY)


def toy_file(tmp_path, width: int = 6):
    g = torch.Generator().manual_seed(width)
    state = {"toy_proj.weight": torch.randn(width, width, generator=g), "toy_proj.bias": torch.randn(width, generator=g)}
    path = tmp_path / f"toy{width}.safetensors"
    save_file(state, str(path))
    return path, state


def meta_ckpt(state: dict[str, tuple[int, ...]]) -> Checkpoint:
    return Checkpoint(Path("meta.pth"), {k: torch.empty(s, device="meta") for k, s in state.items()})


def test_a_registered_architecture_is_detected_inspected_and_built(toy, tmp_path):
    path, state = toy_file(tmp_path)
    info = inspect_file(path)
    assert (info.family, info.supported, info.components) == ("toy", True, ["transformer"])
    assert info.config == {"width": 6, "text_dim": 4, "bits": 2}
    assert "parts: transformer (toy)" in info.summary()
    model = load_transformer(path, dtype=torch.bfloat16)
    assert isinstance(model, Toy) and model.cfg == ToyConfig(width=6) and not model.training
    assert model.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.proj.weight.float(), state["toy_proj.weight"].bfloat16().float())
    assert model.source_fingerprint
    # a transformer architecture is no VAE
    with pytest.raises(ModelLoadError, match="is a toy transformer \\(tests\\), not an Infinity BSQ VAE"):
        load_vae(path)


def test_an_unregistered_architecture_is_not_known(tmp_path):
    path, _ = toy_file(tmp_path)
    with pytest.raises(ModelLoadError, match="not a model this pack knows.*toy_proj.bias.*infinity-vae"):
        inspect_file(path)


def test_unknown_files_list_every_registered_architecture(toy, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match=r"toy \(toy transformer \(tests\)\)"):
        load_transformer(path)


def test_names_are_registered_once_and_parts_are_checked(toy):
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TOY)
    with pytest.raises(ValueError, match="part 'text'"):
        registry.register(Architecture("toy-text", "a text encoder", "text", lambda c: False))
    with pytest.raises(ValueError, match="needs its module"):
        registry.register(Architecture("toy-half", "half declared", "vae", lambda c: False, toy_layout))


def test_detection_by_keys_and_config_by_shapes(toy):
    # Meta tensors: no values exist, so detection and config can only use names and shapes.
    ckpt = meta_ckpt({"toy_proj.weight": (9, 9), "toy_proj.bias": (9,)})
    assert identify(ckpt) is toy
    found = layout_of(ckpt, "transformer")
    assert found.arch is toy and found.config == ToyConfig(width=9) and not found.recorded
    assert identify(meta_ckpt({"toy_proj.weight": (3, 3), "toy_proj.bias": (3,)})).name == "toy"
    with pytest.raises(ModelLoadError, match="not a model this pack knows"):
        identify(meta_ckpt({"toy_proj.weight": (3, 3)}))          # one of its keys is not enough


def test_a_svare_file_names_its_part_architectures(tmp_path):
    transformer = randomise(Infinity(tiny_transformer_config())).eval()
    vae = randomise(BSQVAE(tiny_vae_config())).eval()
    path = save_model(tmp_path / "m.safetensors", transformer=transformer, vae=vae)
    meta = read_metadata(path)
    assert (meta["transformer_arch"], meta["vae_arch"]) == ("infinity", "infinity-vae")
    info = inspect_file(path)
    assert info.family == "svare" and info.architectures == {"transformer": "infinity", "vae": "infinity-vae"}
    assert "parts: transformer (infinity), vae (infinity-vae)" in info.summary()


def test_a_svare_file_of_a_registered_architecture_round_trips(toy, tmp_path):
    path, _ = toy_file(tmp_path)
    model = load_transformer(path)
    saved = save_model(tmp_path / "toy_svare.safetensors", transformer=model)
    assert read_metadata(saved)["transformer_arch"] == "toy"
    again = load_transformer(saved)
    assert isinstance(again, Toy) and again.cfg == model.cfg and torch.equal(again.proj.weight, model.proj.weight)
    assert inspect_file(saved).architectures == {"transformer": "toy"}


def test_a_svare_file_of_an_architecture_not_registered_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    meta = {"format": "svare-var", "transformer_arch": "future-var", "transformer_config": json.dumps({"width": 2})}
    save_file({"transformer.proj.weight": torch.zeros(2, 2)}, str(path), metadata=meta)
    with pytest.raises(ModelLoadError, match="architecture 'future-var', which this pack cannot load"):
        load_transformer(path)


def test_files_that_do_not_name_their_architectures_hold_infinity_parts(tiny_pipeline, tmp_path):
    # Files written before part architectures (and checksums) were recorded, as the toy model first was.
    from safetensors import safe_open

    new = save_model(tmp_path / "new.safetensors", transformer=tiny_pipeline.transformer, vae=tiny_pipeline.vae)
    with safe_open(str(new), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if not k.endswith(("_arch", "checksum"))}
    legacy = tmp_path / "legacy.safetensors"
    save_file(tensors, str(legacy), metadata=meta)
    assert "transformer_arch" not in read_metadata(legacy)
    assert inspect_file(legacy).architectures == {"transformer": "infinity", "vae": "infinity-vae"}
    assert isinstance(load_transformer(legacy), Infinity)
    assert inspect_file(WEIGHTS).architectures == {"transformer": "infinity", "vae": "infinity-vae"}


def test_saving_a_module_of_no_registered_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Toy is not the module of a registered transformer architecture"):
        save_model(tmp_path / "x.safetensors", transformer=Toy(ToyConfig(width=2)))


def test_a_plug_in_brings_its_architecture(monkeypatch, tmp_path):
    """A plug-in's "architecture" (svare_core.plugins) joins the built-in ones when the registry loads."""
    from svare_core import plugins

    monkeypatch.setitem(plugins.registry()._items["architecture"], TOY.name, TOY)
    monkeypatch.setattr(registry, "_architectures", [])
    monkeypatch.setattr(registry, "_loaded", False)
    names = [a.name for a in registry.architectures()]
    assert names[-1] == "toy" and "infinity" in names
    path, _ = toy_file(tmp_path)
    assert isinstance(load_transformer(path), Toy)
