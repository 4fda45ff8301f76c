"""Recognise a checkpoint by its keys, infer its architecture from tensor shapes, load it safely.

One registry of families; each detector looks at key names only, each config reader at shapes
only, so a user just points at a file. Pickled files are read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .format import FORMAT, read_metadata
from .infinity import Infinity, InfinityConfig
from .vae import BSQVAE, VAEConfig


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message names the file, the problem and the fix."""


# -- reading files ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    state: dict[str, torch.Tensor]          # may hold meta/mmap tensors until loaded into a model
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a .safetensors, sharded safetensors (index .json) or .pth/.pt/.ckpt file lazily."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    try:
        if path.suffix == ".json":
            return _read_sharded(path)
        if path.suffix == ".safetensors":
            return Checkpoint(path, _read_safetensors(path), read_metadata(path))
        if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
            # mmap only works on the zip format; older torch.save files are read whole (still weights-only)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            return Checkpoint(path, _unwrap(obj, path))
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - every reader fails differently on a broken file
        raise ModelLoadError(f"{path}: cannot be read ({type(e).__name__}: {e}). The file is corrupt, truncated or "
                             "not a model file: download it again or check the path") from e
    raise ModelLoadError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors, a sharded "
                         "model.safetensors.index.json, or .pth")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _read_sharded(index_path: Path) -> Checkpoint:
    index = json.loads(index_path.read_text())
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
        raise ModelLoadError(f"{index_path}: has no weight_map; expected a Hugging Face shard index")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        shard = index_path.parent / name
        if not shard.exists():
            raise ModelLoadError(f"{index_path}: shard {name} is missing; "
                                 f"download every shard into {index_path.parent}")
        state.update(_read_safetensors(shard))
    return Checkpoint(index_path, state, {})


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Released files nest the weights under "vae", "ema", "model", "state_dict" ..."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            for key in ("vae", "ema", "model", "state_dict", "module", "trainer"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ModelLoadError(f"{path}: holds no state dict of tensors (found {type(obj).__name__})")


# -- families ------------------------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    description: str
    detect: Callable[[Checkpoint], bool]
    read_config: Callable[[Checkpoint], object] | None = None   # None: recognised but not supported yet


def _has(ckpt: Checkpoint, *keys: str) -> bool:
    return all(k in ckpt.state for k in keys)


def _shape(ckpt: Checkpoint, key: str) -> tuple[int, ...]:
    return tuple(ckpt.state[key].shape)


def infinity_config_from_shapes(ckpt: Checkpoint) -> InfinityConfig:
    blocks = sorted({(int(m[1]), int(m[2])) for k in ckpt.state
                     if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))})
    C, bits = _shape(ckpt, "word_embed.weight")
    return InfinityConfig(
        depth=len(blocks), embed_dim=C, num_heads=_shape(ckpt, "block_chunks.0.module.0.sa.scale_mul_1H11")[1],
        text_dim=_shape(ckpt, "text_norm.weight")[0], bits=bits,
        ffn_dim=_shape(ckpt, "block_chunks.0.module.0.ffn.fc1.weight")[0],
        num_block_chunks=len({c for c, _ in blocks}), num_levels=_shape(ckpt, "lvl_embed.weight")[0],
        text_max_len=_shape(ckpt, "cfg_uncond")[0], pool_heads=_shape(ckpt, "text_proj_for_sos.ca.mat_q")[1])


_PLAIN_CONVS = {"conv_in", "conv_out", "conv1", "conv2", "nin_shortcut"}
_PLAIN_NORMS = {"norm1", "norm2", "norm_out"}


def normalise_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept plain (``conv1.weight``) and wrapped (``conv1.conv.weight``) layer names; drop the
    ``quantize.*`` alias of ``quantizer.*``."""
    out = {}
    for k, v in state.items():
        if k.startswith("quantize."):
            continue
        *mod, param = k.split(".")
        resample_conv = len(mod) > 1 and mod[-1] == "conv" and mod[-2] in ("downsample", "upsample")
        if mod and (mod[-1] in _PLAIN_CONVS or resample_conv):
            mod.append("conv")
        elif mod and mod[-1] in _PLAIN_NORMS:
            mod.append("norm")
        out[".".join(mod + [param])] = v
    return out


def vae_config_from_shapes(ckpt: Checkpoint) -> VAEConfig:
    state = normalise_vae_keys(ckpt.state)
    ch = state["encoder.conv_in.conv.weight"].shape[0]
    levels = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = tuple(state[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0] // ch for i in levels)
    n_blocks = len({int(m[1]) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    z = state["encoder.conv_out.conv.weight"].shape[0]
    # GroupNorm's group count is not in the weights: released VAEs use 32 (24 where 32 does not divide).
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=n_blocks, z_channels=z, norm_groups=32)


FAMILIES: list[Family] = [
    Family("infinity", "Infinity text-to-image transformer (bitwise tokens)",
           lambda c: _has(c, "word_embed.weight", "text_proj_for_sos.ca.mat_q",
                          "block_chunks.0.module.0.sa.mat_qkv.weight"),
           infinity_config_from_shapes),
    Family("infinity-vae", "Infinity BSQ VAE",
           lambda c: any(k in c.state for k in ("encoder.conv_in.conv.weight", "encoder.conv_in.weight"))
           and any(k.startswith("decoder.up.") for k in c.state)
           and not any(k.startswith("quantize.embedding") for k in c.state),
           vae_config_from_shapes),
    Family("var", "VAR class-conditional ImageNet transformer (FoundationVision/VAR)",
           lambda c: _has(c, "class_emb.weight", "blocks.0.attn.mat_qkv.weight")),
    Family("var-vqvae", "VAR multi-scale VQVAE (vocabulary 4096)",
           lambda c: _has(c, "quantize.embedding.weight", "post_quant_conv.weight")),
]


@dataclass
class ModelInfo:
    path: Path
    family: str
    description: str
    config: dict
    num_params: int
    supported: bool
    components: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}", f"  family: {self.family} ({self.description})",
                 f"  parameters: {self.num_params:,}", f"  supported: {'yes' if self.supported else 'not yet'}"]
        for k, v in self.config.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def identify(ckpt: Checkpoint) -> Family:
    if ckpt.metadata.get("format") == FORMAT:
        return Family("svare", "svare model file (configs in metadata)", lambda c: True, None)
    for fam in FAMILIES:
        if fam.detect(ckpt):
            return fam
    sample = ", ".join(sorted(ckpt.state)[:6])
    raise ModelLoadError(
        f"{ckpt.path}: not a model this pack knows (keys start with: {sample}). Expected one of: "
        + "; ".join(f"{f.name} ({f.description})" for f in FAMILIES) + "; or a svare .safetensors file")


def inspect_file(path: str | Path) -> ModelInfo:
    """What a file is: family, inferred config, parameter count; raises ModelLoadError if unusable."""
    ckpt = read_checkpoint(path)
    fam = identify(ckpt)
    n = sum(t.numel() for k, t in ckpt.state.items() if t.is_floating_point())
    if fam.name == "svare":
        config = {k: json.loads(v) for k, v in ckpt.metadata.items() if k.endswith("_config")}
        comps = [k[: -len("_config")] for k in config]
        return ModelInfo(Path(path), "svare", fam.description, config, n, True, comps)
    if fam.read_config is None:
        return ModelInfo(Path(path), fam.name, fam.description, {}, n, False)
    cfg = fam.read_config(ckpt)
    return ModelInfo(Path(path), fam.name, fam.description, cfg.to_dict(), n, True,
                     ["transformer" if fam.name == "infinity" else "vae"])


# -- building modules ------------------------------------------------------------------------------
def _few(keys: list[str]) -> str:
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"


def _build(module_cls, cfg, state: dict[str, torch.Tensor], path: Path, device, dtype):
    with torch.device("meta"):
        module = module_cls(cfg)
    expected = module.state_dict()
    expected = {k: v for k, v in expected.items() if not k.startswith("quantize.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{path}: does not match the inferred {module_cls.__name__} architecture: "
                             f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}. "
                             "The file is incomplete or from another model.")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelLoadError(f"{path}: tensor shapes do not fit the inferred architecture, e.g. {bad[:3]}")
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for k, p in module.state_dict().items():
            if k.startswith("quantize."):
                continue
            p.copy_(state[k] if not state[k].is_floating_point() else state[k].to(p.dtype))
    module.eval()
    return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)


def _svare_part(ckpt: Checkpoint, path: str | Path, part: str, config_cls, what: str) -> tuple[object, dict]:
    """(config, state) of one part of a svare file: the JSON config in metadata ``{part}_config`` and the
    tensors under ``{part}.`` with that prefix stripped."""
    if f"{part}_config" not in ckpt.metadata:
        raise ModelLoadError(f"{path}: this svare file holds no {what}")
    cfg = config_cls.from_dict(json.loads(ckpt.metadata[f"{part}_config"]))
    prefix = f"{part}."
    return cfg, {k[len(prefix):]: v for k, v in ckpt.state.items() if k.startswith(prefix)}


def load_transformer(path: str | Path, *, device="cpu", dtype: torch.dtype | None = torch.float32) -> Infinity:
    ckpt = read_checkpoint(path)
    fam = identify(ckpt)
    if fam.name == "svare":
        cfg, state = _svare_part(ckpt, path, "transformer", InfinityConfig, "transformer")
    elif fam.name == "infinity":
        cfg, state = infinity_config_from_shapes(ckpt), ckpt.state
    else:
        raise ModelLoadError(f"{path}: is a {fam.description}, not an Infinity transformer")
    return _build(Infinity, cfg, state, Path(path), device, dtype)


def load_vae(path: str | Path, *, device="cpu", dtype: torch.dtype | None = torch.float32,
             token_bits: int | None = None) -> BSQVAE:
    """Load a VAE. ``token_bits``: the bits per token of the transformer it will serve; a raw
    Infinity VAE whose latent is narrower is patchified to fit (Infinity-8B: 14 channels, 2x2)."""
    ckpt = read_checkpoint(path)
    fam = identify(ckpt)
    if fam.name == "svare":
        cfg, state = _svare_part(ckpt, path, "vae", VAEConfig, "VAE")
    elif fam.name == "infinity-vae":
        cfg, state = vae_config_from_shapes(ckpt), normalise_vae_keys(ckpt.state)
        if token_bits is not None:
            cfg.patch_size = next((p for p in (1, 2, 4) if cfg.z_channels * p * p == token_bits), 0)
    else:
        raise ModelLoadError(f"{path}: is a {fam.description}, not an Infinity BSQ VAE")
    if token_bits is not None and cfg.bits != token_bits:
        raise ModelLoadError(f"{path}: this VAE makes {cfg.z_channels}-channel latents, which do not fit a transformer "
                             f"with {token_bits}-bit tokens: choose the VAE released with that transformer "
                             "(Infinity-2B: infinity_vae_d32reg.pth; Infinity-8B: infinity_vae_d56_f8_14_patchify.pth)")
    return _build(BSQVAE, cfg, state, Path(path), device, dtype)
