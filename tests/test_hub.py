"""svare_core.hub: known Infinity / Flan-T5 / Switti files found locally, in a (fake) Hugging Face cache, or downloaded."""
from __future__ import annotations

from pathlib import Path

import pytest

from svare_core import hub

HASH = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding ``files`` of ``repo_id`` at revision main; returns the snapshot folder."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / HASH
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HASH)
    return snap


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_registry_labels():
    assert hub.labels("transformer") == ["infinity_2b_reg.pth (download)", "infinity_8b_weights (download)",
                                         "Switti-1024 (download)", "Switti (download)", "Switti-AR (download)"]
    assert "infinity_vae_d32reg.pth (download)" in hub.labels("vae") and "VQVAE-Switti (download)" in hub.labels("vae")
    assert hub.labels("text_encoder") == ["flan-t5-xl (download)"]
    assert hub.from_label("flan-t5-xl (download)").repo_id == "google/flan-t5-xl"
    assert hub.from_label("flan-t5-xl") is None and hub.from_label("nope (download)") is None


def test_resolves_from_the_local_hf_cache_offline(offline, tmp_path, tiny_pipeline):
    from svare_core.models.format import save_model

    src = save_model(tmp_path / "tiny.safetensors", vae=tiny_pipeline.vae)
    snap = fake_cache(offline, "FoundationVision/Infinity", {"infinity_vae_d32reg.pth": src.read_bytes()})
    dest = tmp_path / "models" / "var"
    for name in ("infinity_vae_d32reg.pth", "infinity_vae_d32reg.pth (download)"):
        path = hub.resolve(name, dest)
        assert path == snap / "infinity_vae_d32reg.pth" and path.read_bytes() == src.read_bytes()
    assert not dest.exists(), "resolving from the cache must not create or download anything"


def test_sharded_and_folder_models_from_the_cache(offline, tmp_path):
    m8 = hub.MODELS["infinity_8b_weights"]
    snap = fake_cache(offline, m8.repo_id, {f: b"{}" for f in m8.files})
    assert hub.resolve("infinity_8b_weights", tmp_path) == snap / "infinity_8b_weights" / "model.safetensors.index.json"
    t5 = hub.MODELS["flan-t5-xl"]
    snap = fake_cache(offline, t5.repo_id, {f: b"{}" for f in t5.files})
    assert hub.resolve("flan-t5-xl (download)", tmp_path) == snap
    (snap / t5.files[-1]).unlink()                      # an incomplete snapshot does not count
    with pytest.raises(hub.HubFileMissing):
        hub.resolve("flan-t5-xl", tmp_path / "empty")


def test_local_models_folder_comes_first(offline, tmp_path):
    fake_cache(offline, "FoundationVision/Infinity", {"infinity_2b_reg.pth": b"cached"})
    dest = tmp_path / "var"
    dest.mkdir()
    (dest / "infinity_2b_reg.pth").write_bytes(b"local")
    assert hub.resolve("infinity_2b_reg.pth", dest) == dest / "infinity_2b_reg.pth"


def test_missing_file_offline_says_what_to_download_and_where(offline, tmp_path):
    dest = tmp_path / "models" / "var"
    with pytest.raises(hub.HubFileMissing) as e:
        hub.resolve("infinity_2b_reg.pth (download)", dest)
    msg = str(e.value)
    for part in ("infinity_2b_reg.pth", "https://huggingface.co/FoundationVision/Infinity", str(dest), "HF_HUB_OFFLINE"):
        assert part in msg
    with pytest.raises(hub.HubFileMissing, match=r"flan-t5-xl.*google/flan-t5-xl"):
        hub.resolve("flan-t5-xl", tmp_path / "text_encoders")
    with pytest.raises(KeyError, match="known"):
        hub.resolve("sd15.ckpt", dest)


def test_downloads_into_the_models_folder_when_online(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []

    def fake_download(repo_id, filename, *, local_dir, **kw):
        calls.append((repo_id, filename, Path(local_dir)))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"x")
        return str(out)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    t5 = tmp_path / "text_encoders"
    assert hub.resolve("flan-t5-xl", t5) == t5 / "flan-t5-xl"
    assert {c[1] for c in calls} == set(hub.MODELS["flan-t5-xl"].files) and {c[2] for c in calls} == {t5 / "flan-t5-xl"}
    calls.clear()
    var = tmp_path / "var"
    assert hub.resolve("infinity_8b_weights", var) == var / "infinity_8b_weights" / "model.safetensors.index.json"
    assert len(calls) == 5 and all(c[2] == var for c in calls)

    def failing(*a, **kw):
        raise OSError("no route to host")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(hub.HubFileMissing, match="download failed.*no route to host"):
        hub.resolve("infinity_2b_reg.pth", var)


def test_switti_releases_resolve_to_their_model_file_with_config_beside_it(offline, tmp_path, monkeypatch):
    sw = hub.MODELS["Switti-1024"]
    snap = fake_cache(offline, sw.repo_id, {"model.safetensors": b"w", "config.json": b"{}"})
    assert hub.resolve("Switti-1024 (download)", tmp_path / "var") == snap / "model.safetensors"
    with pytest.raises(hub.HubFileMissing) as e:                 # the VQ-VAE is not cached: instructions
        hub.resolve("VQVAE-Switti", tmp_path / "var")
    assert 'hf download yresearch/VQVAE-Switti "model.safetensors" "config.json" --local-dir' in str(e.value)
    assert str(tmp_path / "var" / "VQVAE-Switti") in str(e.value)
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    got = []

    def fake_download(repo_id, filename, *, local_dir, **kw):
        got.append((repo_id, filename))
        (Path(local_dir) / filename).write_bytes(b"x")
        return str(Path(local_dir) / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    var = tmp_path / "var2"
    assert hub.resolve("Switti-AR", var) == var / "Switti-AR" / "model.safetensors"
    assert (var / "Switti-AR" / "config.json").is_file()       # what tells the AR variant apart
    assert got == [("yresearch/Switti-AR", "model.safetensors"), ("yresearch/Switti-AR", "config.json")]
