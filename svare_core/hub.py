"""Known downloadable model files (Infinity, Flan-T5, Switti) and where to get them from Hugging Face.

    from svare_core import hub
    path = hub.resolve("infinity_2b_reg.pth", dest="/ComfyUI/models/var")

``resolve`` looks in ``dest`` first, then in the local Hugging Face cache, and only then downloads
into ``dest`` (with huggingface_hub's progress bars). Offline (``HF_HUB_OFFLINE=1``) or when the
download fails, it raises :class:`HubFileMissing` naming the file, its repository and the folder
to put it in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class HubFileMissing(FileNotFoundError):
    """A known model file is neither local nor cached and cannot be downloaded now."""


@dataclass(frozen=True)
class HubModel:
    name: str                 # what users pick ("infinity_2b_reg.pth"); a file or folder inside ``dest``
    repo_id: str
    files: tuple[str, ...]    # paths inside the repository
    role: str                 # transformer | vae | text_encoder
    folder: str               # ComfyUI models sub-folder the files go to (var, text_encoders)
    entry: str = ""           # what the loader opens, relative to ``dest`` ("" -> ``name``)
    subdir: str = ""          # download into dest/subdir (a repository's root files into their own folder)
    size: str = ""

    @property
    def label(self) -> str:
        """How loaders list it before it is downloaded."""
        return f"{self.name} (download)"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


_INFINITY = "FoundationVision/Infinity"
_8B = "infinity_8b_weights"
_SWITTI_FILES = ("model.safetensors", "config.json")
_T5_FILES = ("config.json", "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json",
             "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")

MODELS: dict[str, HubModel] = {m.name: m for m in (
    HubModel("infinity_2b_reg.pth", _INFINITY, ("infinity_2b_reg.pth",), "transformer", "var", size="~8 GB"),
    HubModel("infinity_vae_d32reg.pth", _INFINITY, ("infinity_vae_d32reg.pth",), "vae", "var", size="~0.5 GB"),
    HubModel(_8B, _INFINITY, tuple(f"{_8B}/model-{i:05d}-of-00004.safetensors" for i in range(1, 5))
             + (f"{_8B}/model.safetensors.index.json",), "transformer", "var",
             entry=f"{_8B}/model.safetensors.index.json", size="~35 GB"),
    HubModel("infinity_vae_d56_f8_14_patchify.pth", _INFINITY, ("infinity_vae_d56_f8_14_patchify.pth",), "vae", "var",
             size="~0.5 GB"),
    HubModel("flan-t5-xl", "google/flan-t5-xl", _T5_FILES, "text_encoder", "text_encoders", subdir="flan-t5-xl",
             size="~11 GB"),
    # Switti: each repository's root holds model.safetensors and the config.json that tells the variant
    # (use_ar) apart; both go into a folder named like the repository. The model pages state no weight
    # licence (docs/switti.md): a download fetches the authors' files from their repository.
    *(HubModel(name, f"yresearch/{name}", _SWITTI_FILES, "transformer", "var", entry=f"{name}/model.safetensors",
               subdir=name, size=size) for name, size in (("Switti-1024", "~10 GB"), ("Switti", "~10 GB"),
                                                          ("Switti-AR", "~10 GB"))),
    HubModel("VQVAE-Switti", "yresearch/VQVAE-Switti", _SWITTI_FILES, "vae", "var",
             entry="VQVAE-Switti/model.safetensors", subdir="VQVAE-Switti", size="~0.4 GB"),
)}


def labels(role: str) -> list[str]:
    """Download labels of the known models of a role, for a loader's list."""
    return [m.label for m in MODELS.values() if m.role == role]


def from_label(label: str) -> HubModel | None:
    """The known model a loader label names ("infinity_2b_reg.pth (download)"), else None."""
    name = label[: -len(" (download)")] if label.endswith(" (download)") else None
    return MODELS.get(name) if name else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or None


def _local(model: HubModel, dest: Path) -> Path | None:
    root = dest / model.subdir
    if all((root / f).is_file() for f in model.files):
        return dest / (model.entry or model.name)
    return None


def _cached(model: HubModel) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    paths = []
    for f in model.files:
        hit = try_to_load_from_cache(model.repo_id, f, cache_dir=_cache_dir())
        if not isinstance(hit, str):
            return None
        paths.append(Path(hit))
    # A snapshot folder mirrors the repository tree: locate the entry from the first file.
    snapshot = paths[0]
    for _ in Path(model.files[0]).parts:
        snapshot = snapshot.parent
    if model.subdir:                       # a whole repository (a text-encoder folder, a Switti release)
        return snapshot / Path(model.entry).relative_to(model.subdir) if model.entry else snapshot
    return snapshot / (model.entry or model.name)


def instructions(model: HubModel, dest: Path) -> str:
    where = dest / model.subdir if model.subdir else dest
    files = (", ".join(model.files) if len(model.files) <= 2
             else f"{len(model.files)} files ({', '.join(model.files[:2])}, ...)")
    include = f'--include "{model.files[0].split("/")[0]}/*"' if "/" in model.files[0] else " ".join(
        f'"{f}"' for f in model.files)
    return (f"{model.name} ({model.size}) is not in {where} nor in the Hugging Face cache. Download {files} "
            f"from {model.url} into {where}, e.g.\n"
            f"  hf download {model.repo_id} {include} --local-dir {where}")


def resolve(name: str, dest: str | Path, *, download: bool = True) -> Path:
    """The local path of the known model ``name`` (a file, a shard index, or a folder).

    Looks in ``dest`` (a ComfyUI models folder), then the Hugging Face cache; downloads into
    ``dest`` if allowed and online. Raises HubFileMissing with download instructions otherwise.
    """
    model = MODELS.get(name) or from_label(name)
    if model is None:
        raise KeyError(f"unknown downloadable model {name!r}; known: {', '.join(MODELS)}")
    dest = Path(dest).expanduser()
    found = _local(model, dest) or _cached(model)
    if found is not None:
        return found
    if offline() or not download:
        reason = "downloads are off (HF_HUB_OFFLINE=1)" if offline() else "downloading was not allowed"
        raise HubFileMissing(f"{instructions(model, dest)}\n({reason})")
    from huggingface_hub import hf_hub_download

    target = dest / model.subdir
    target.mkdir(parents=True, exist_ok=True)
    try:
        for f in model.files:
            hf_hub_download(model.repo_id, f, local_dir=target)
    except Exception as e:  # noqa: BLE001 - network, auth, disk: all end in the same instructions
        raise HubFileMissing(f"{instructions(model, dest)}\n(the download failed: {type(e).__name__}: {e})") from e
    return dest / (model.entry or model.name)
