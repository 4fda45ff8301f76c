"""Switti's text conditioning: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers, read from local files.

What the reference pipeline (yandex-research/switti, ``SwittiPipeline.encode_prompt``) computes, and so
what :class:`SwittiText` returns for a batch of prompts:

- each tower tokenizes the prompts with its own CLIP tokenizer, truncated and padded to 77 tokens
  (``truncation=True, max_length=77, padding="max_length"``), and runs with that attention mask;
- ``features`` (B, 77, 768 + 1280 = 2048): the two towers' last hidden states, after their final
  layer norm, concatenated (CLIP-L first);
- ``pooled`` (B, 1280): bigG's hidden state at the first end-of-text token, WITHOUT bigG's
  ``text_projection`` (the reference uses ``CLIPTextModel.pooler_output``);
- ``mask`` (B, 77) bool: bigG's attention mask, True on real tokens (start, prompt, end). The
  reference turns it into the additive cross-attention bias 0 / -inf (:func:`attention_bias`).

Each tower comes from a local folder or file, never from the network:

- a Hugging Face folder (``openai/clip-vit-large-patch14``, ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``,
  or a diffusers pipeline's ``text_encoder`` / ``text_encoder_2``) whose config.json must describe the
  tower; its tokenizer is the folder's own (or the sibling ``tokenizer`` / ``tokenizer_2``);
- a single weights file: ComfyUI's ``clip_l.safetensors`` / ``clip_g.safetensors`` (Hugging Face key
  names under ``text_model.``), an OpenCLIP file (``transformer.resblocks.*``, e.g. the laion repo's
  ``open_clip_pytorch_model.bin``), or a checkpoint holding the tower under a prefix (SDXL's
  ``conditioner.embedders.*``). A file has no tokenizer: pass a CLIP tokenizer folder (vocab.json +
  merges.txt, or tokenizer.json) for it; ComfyUI ships one as ``comfy/sd1_tokenizer`` and both towers
  use the same vocabulary. The tokenizer decides the padding: openai's (and ComfyUI's) pads with
  end-of-text; a Hugging Face tokenizer whose pad token is "!" (SDXL's ``tokenizer_2``) also reads
  every "!" in a prompt as that token, so "dog!" is tokenized differently. Padding itself is masked;
  to get exactly the reference's bigG tokens, give the tokenizer of the bigG folder the reference
  downloads.

A file is accepted when its tensors have exactly the shapes of the expected tower (width, depth, MLP
width, 49,408-token vocabulary, 77 positions); anything else is refused with one line naming what the
file holds. Shapes cannot tell a fine-tuned CLIP of the same size from the released one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import Checkpoint, ModelLoadError, read_checkpoint
from .text import FrozenTextEncoder, PromptCache, stream_model

MAX_TOKENS = 77   # CLIP's context: the reference pads and truncates every prompt to it


@dataclass(frozen=True)
class CLIPTextArch:
    """One CLIP text tower, as its files must hold it. Heads and activation are not in the weights."""
    name: str
    width: int
    layers: int
    heads: int
    mlp: int
    activation: str                      # transformers' hidden_act
    vocab: int = 49408
    positions: int = MAX_TOKENS
    eps: float = 1e-5

    def config(self):
        from transformers import CLIPTextConfig
        return CLIPTextConfig(vocab_size=self.vocab, hidden_size=self.width, intermediate_size=self.mlp,
                              num_hidden_layers=self.layers, num_attention_heads=self.heads,
                              max_position_embeddings=self.positions, hidden_act=self.activation,
                              layer_norm_eps=self.eps)

    def shape_text(self) -> str:
        return f"{self.width} wide, {self.layers} layers, {self.positions} positions"


CLIP_L = CLIPTextArch("CLIP ViT-L/14 (openai/clip-vit-large-patch14; ComfyUI's clip_l)",
                      width=768, layers=12, heads=12, mlp=3072, activation="quick_gelu")
CLIP_G = CLIPTextArch("OpenCLIP ViT-bigG/14 (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k; ComfyUI's clip_g)",
                      width=1280, layers=32, heads=20, mlp=5120, activation="gelu")

# What a file of another size most likely is, for the message that refuses it.
_KNOWN = {(768, 12): "CLIP ViT-L/14 (clip_l)", (1280, 32): "OpenCLIP ViT-bigG/14 (clip_g)",
          (1024, 24): "OpenCLIP ViT-H/14 (Stable Diffusion 2's text encoder)", (512, 12): "CLIP ViT-B"}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class SwittiTextCondition(NamedTuple):
    """The contract with the Switti transformer (CPU, float32): see the module docstring."""
    # The order of Infinity's text encoders (features, mask) with the pooled vector last, so that
    # ``transformer.encode_text(*text.encode(prompts))`` reads the same for both families.
    features: torch.Tensor    # (B, 77, 2048): CLIP-L (768) then bigG (1280) last hidden states
    mask: torch.Tensor        # (B, 77) bool: True on real tokens (bigG's attention mask)
    pooled: torch.Tensor      # (B, 1280): bigG at its first end-of-text token, no projection


def attention_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's cross-attention bias from a mask: 0 on real tokens, -inf on padding."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask.cpu(), float("-inf")).to(mask.device)


class SwittiText(FrozenTextEncoder):
    """Prompts -> :class:`SwittiTextCondition` (features (B, 77, 2048), mask (B, 77), pooled (B, 1280)).

    ``clip_l`` / ``clip_g``: a folder or a weights file of each tower (module docstring);
    ``tokenizer_l`` / ``tokenizer_g``: CLIP tokenizer folders, needed for towers given as files (a
    folder's own tokenizer wins). ``dtype``: what the towers run in; bf16 by default, as the
    reference pipeline runs them (fp32 doubles the memory: CLIP-L 0.5 GB, bigG 2.8 GB).
    ``offload``: the towers live on the CPU and visit ``device`` only while encoding. Results are
    cached per prompt (at most ``cache_size`` prompts and ``cache_bytes`` bytes of CPU memory, about
    0.3 MB a prompt in bf16); :meth:`clear_cache` empties the cache. ``arch_l`` / ``arch_g``: the
    towers the files must hold (the released ones; tests give tiny ones).
    """

    def __init__(self, clip_l: str | Path, clip_g: str | Path, *, tokenizer_l: str | Path | None = None,
                 tokenizer_g: str | Path | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, offload: bool = False,
                 cache_size: int = 1024, cache_bytes: int = 256 * 2**20,
                 arch_l: CLIPTextArch = CLIP_L, arch_g: CLIPTextArch = CLIP_G):
        self.run_device = torch.device(device)
        self.offload = offload and self.run_device.type != "cpu"
        home = "cpu" if self.offload else self.run_device
        tower_l, self.tokenizer_l = load_clip_text(clip_l, arch_l, dtype=dtype, tokenizer=tokenizer_l, role="clip_l")
        tower_g, self.tokenizer_g = load_clip_text(clip_g, arch_g, dtype=dtype, tokenizer=tokenizer_g, role="clip_g")
        # One module, so that a host (ComfyUI's model management) moves and counts both towers together.
        self.model = torch.nn.ModuleDict({"clip_l": tower_l, "clip_g": tower_g}).to(home).eval()
        self.model.requires_grad_(False)
        self.width = arch_l.width + arch_g.width
        self.pooled_width = arch_g.width
        self.max_length = MAX_TOKENS
        self._cache = PromptCache(cache_size, cache_bytes)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[tuple[torch.Tensor, ...]]:
        hidden, batches = [], []
        for name, tok in (("clip_l", self.tokenizer_l), ("clip_g", self.tokenizer_g)):
            batch = tok(prompts, truncation=True, max_length=MAX_TOKENS, padding="max_length", return_tensors="pt")
            out = self.model[name](input_ids=batch["input_ids"].to(self.device),
                                   attention_mask=batch["attention_mask"].to(self.device))
            hidden.append(out.last_hidden_state.cpu())
            batches.append(batch)
        ids_g, mask_g = batches[1]["input_ids"], batches[1]["attention_mask"].bool()
        end = ids_g == self.tokenizer_g.eos_token_id
        if not bool(end.any(1).all()):
            raise ValueError("the clip_g tokenizer does not end its sequences with its end-of-text token: "
                             "give a CLIP tokenizer folder")
        first_end = end.int().argmax(1)
        pooled = hidden[1][torch.arange(len(prompts)), first_end]
        features = torch.cat(hidden, dim=-1)
        # Cached in the towers' dtype (bf16: exact, half the memory); each row its own copy, not a batch view.
        return [(features[i].clone(), pooled[i].clone(), mask_g[i].clone()) for i in range(len(prompts))]

    def encode(self, prompts: list[str] | str) -> SwittiTextCondition:
        """The condition of ``prompts`` (float32 on the CPU). The unconditional row of classifier-free
        guidance is the empty prompt ``""``, encoded like any other (the reference's null prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = self._encoded(prompts)
        return SwittiTextCondition(features=torch.stack([r[0] for r in rows]).float(),
                                   mask=torch.stack([r[2] for r in rows]),
                                   pooled=torch.stack([r[1] for r in rows]).float())


# -- loading one tower --------------------------------------------------------------------------------
def load_clip_text(path: str | Path, arch: CLIPTextArch, *, dtype: torch.dtype = torch.bfloat16,
                   tokenizer: str | Path | None = None, role: str = "text encoder"):
    """(transformers CLIPTextModel in ``dtype`` on the CPU, its CLIPTokenizer) from a folder or a file,
    streamed one tensor at a time. ``role`` names the input in messages ("clip_l")."""
    from transformers import CLIPTextModel

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{role}: {path} does not exist: give a {arch.name} folder or weights file")
    if path.is_dir():
        _check_folder_config(path, arch, role)
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise ModelLoadError(f"{role}: {path} holds no weights (one of {', '.join(_WEIGHT_FILES)}): "
                                 "download the whole model folder")
        tok_folder = _tokenizer_folder(path) or tokenizer
    else:
        weights, tok_folder = path, tokenizer
    tok = _load_tokenizer(tok_folder, weights, role)      # before the weights: a missing tokenizer fails fast
    ckpt = read_checkpoint(weights)
    sources = clip_text_sources(ckpt, arch, role)
    module_key = _module_keys(arch)
    positions = next(k for k, _ in _meta_model(arch).named_buffers() if k.endswith("position_ids"))
    model = stream_model(CLIPTextModel, arch.config(), ckpt, {module_key[k]: src for k, src in sources.items()}, dtype,
                         buffers={positions: torch.arange(arch.positions).expand(1, -1)})
    return model.eval(), tok


def clip_text_sources(ckpt: Checkpoint, arch: CLIPTextArch, role: str = "text encoder") -> dict[str, tuple[str, slice | None]]:
    """Where each tensor of ``arch``'s CLIPTextModel lies in ``ckpt`` (file key, rows), from key names
    and shapes only. Hugging Face / ComfyUI (``text_model.*``) and OpenCLIP (``transformer.resblocks.*``)
    layouts, under any prefix; refuses a file that holds no tower of ``arch``'s shape."""
    towers = _find_towers(ckpt)
    if not towers:
        raise ModelLoadError(f"{role}: {ckpt.path} {_what_else(ckpt)}; expected {arch.name}")
    fitting = [t for t in towers if (t.width, t.layers) == (arch.width, arch.layers)]
    if not fitting:
        t = towers[0]
        raise ModelLoadError(f"{role}: {ckpt.path} holds a CLIP text encoder {t.width} wide with {t.layers} layers "
                             f"({_KNOWN.get((t.width, t.layers), 'an unknown CLIP')}), not {arch.name} "
                             f"({arch.shape_text()}): give the {role} file here")
    if len(fitting) > 1:
        raise ModelLoadError(f"{role}: {ckpt.path} holds {len(fitting)} text encoders of {arch.name}'s size (under "
                             f"{[t.prefix for t in fitting]}): give a file with one")
    tower = fitting[0]
    sources = tower.sources(arch)
    for key, (src, rows) in sources.items():
        if src not in ckpt.state:
            raise ModelLoadError(f"{role}: {ckpt.path} lacks {src}, which {arch.name} needs; the file is incomplete "
                                 "or corrupt: download it again")
    want = _expected_shapes(arch)
    for key, (src, rows) in sources.items():
        shape, expected = tuple(ckpt.state[src].shape), want[key]
        if rows is not None:                       # a fused q/k/v tensor: three of these, stacked
            expected = (3 * expected[0],) + expected[1:]
        if shape != expected:
            what = (f"{shape[0]} positions (a long-context CLIP is another model)"
                    if key.endswith("position_embedding.weight") and shape else f"shape {shape}")
            raise ModelLoadError(f"{role}: {ckpt.path} is not {arch.name}: {src} has {what}, expected {expected}")
    return sources


@dataclass(frozen=True)
class _Tower:
    prefix: str
    openclip: bool
    width: int
    layers: int

    def sources(self, arch: CLIPTextArch) -> dict[str, tuple[str, slice | None]]:
        p, W = self.prefix, arch.width
        if not self.openclip:        # our model's keys are the file's, after the prefix
            return {k: (p + k, None) for k in _expected_shapes(arch)}
        out = {"text_model.embeddings.token_embedding.weight": (p + "token_embedding.weight", None),
               "text_model.embeddings.position_embedding.weight": (p + "positional_embedding", None),
               "text_model.final_layer_norm.weight": (p + "ln_final.weight", None),
               "text_model.final_layer_norm.bias": (p + "ln_final.bias", None)}
        for i in range(arch.layers):
            ours, theirs = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                for t in ("weight", "bias"):
                    out[f"{ours}{a}.{t}"] = (f"{theirs}{b}.{t}", None)
            for j, qkv in enumerate(("q_proj", "k_proj", "v_proj")):   # fused in that order, rows stacked
                for t in ("weight", "bias"):
                    out[f"{ours}self_attn.{qkv}.{t}"] = (f"{theirs}attn.in_proj_{t}", slice(j * W, (j + 1) * W))
        return out


def _find_towers(ckpt: Checkpoint) -> list[_Tower]:
    towers = []
    for key in ckpt.state:
        if key.endswith("text_model.embeddings.token_embedding.weight"):
            prefix, openclip = key[:-len("text_model.embeddings.token_embedding.weight")], False
            layer = re.compile(re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\.")
        elif key.endswith("token_embedding.weight") and \
                key[:-len("token_embedding.weight")] + "transformer.resblocks.0.ln_1.weight" in ckpt.state:
            prefix, openclip = key[:-len("token_embedding.weight")], True
            layer = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        else:
            continue
        shape = ckpt.shape(key)
        depth = len({m[1] for k in ckpt.state if (m := layer.match(k))})
        if len(shape) == 2:
            towers.append(_Tower(prefix, openclip, shape[1], depth))
    return towers


def _what_else(ckpt: Checkpoint) -> str:
    keys = list(ckpt.state)
    if any(k.startswith(("vision_model.", "visual.")) for k in keys):
        return "is a CLIP image encoder (clip_vision, e.g. for IP-Adapter), not a text encoder"
    if any(".SelfAttention." in k or k.startswith("shared.") for k in keys):
        return "is a T5 text encoder, not CLIP"
    return ("holds no CLIP text encoder (keys like text_model.encoder.layers.0.mlp.fc1.weight, as in ComfyUI's "
            "clip_l / clip_g, or OpenCLIP's transformer.resblocks.0.attn.in_proj_weight)")


_META: dict[CLIPTextArch, torch.nn.Module] = {}


def _meta_model(arch: CLIPTextArch) -> torch.nn.Module:
    if arch not in _META:
        from transformers import CLIPTextModel
        with torch.device("meta"):
            _META[arch] = CLIPTextModel(arch.config())
    return _META[arch]


def _module_keys(arch: CLIPTextArch) -> dict[str, str]:
    """The files' key names (``text_model.`` first, as Hugging Face and ComfyUI store the tower) -> the
    module's own, which differ between transformers versions (5.x dropped the ``text_model.`` level)."""
    return {k if k.startswith("text_model.") else "text_model." + k: k for k in _meta_model(arch).state_dict()}


def _expected_shapes(arch: CLIPTextArch) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor of ``arch``'s text tower."""
    state = _meta_model(arch).state_dict()
    return {k: tuple(state[m].shape) for k, m in _module_keys(arch).items()}


def _check_folder_config(path: Path, arch: CLIPTextArch, role: str) -> None:
    """A Hugging Face folder's config.json (CLIPModel, CLIPTextModel or ...WithProjection) must describe
    ``arch``: heads and activation are not in the weights, so they are checked here."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{role}: folder {path} has no config.json: give a Hugging Face model folder "
                             f"of {arch.name}, or its weights file")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("text_config") or {}
    elif cfg.get("model_type") != "clip_text_model":
        raise ModelLoadError(f"{role}: {path} holds a {cfg.get('model_type')!r} model, not a CLIP text encoder "
                             f"({arch.name})")
    from transformers import CLIPTextConfig
    defaults = CLIPTextConfig()
    want = {"hidden_size": arch.width, "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads,
            "intermediate_size": arch.mlp, "hidden_act": arch.activation, "vocab_size": arch.vocab,
            "max_position_embeddings": arch.positions, "layer_norm_eps": arch.eps}
    bad = {k: cfg.get(k, getattr(defaults, k)) for k, v in want.items() if cfg.get(k, getattr(defaults, k)) != v}
    if bad:
        raise ModelLoadError(f"{role}: {path} is not {arch.name}: its config.json has {bad}, expected "
                             f"{ {k: want[k] for k in bad} }")


def _tokenizer_folder(path: Path) -> Path | None:
    """The folder's own tokenizer, or a diffusers pipeline's sibling (text_encoder_2 -> tokenizer_2)."""
    candidates = [path, path.parent / path.name.replace("text_encoder", "tokenizer")]
    return next((c for c in candidates if c.is_dir() and _has_tokenizer(c)), None)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _load_tokenizer(folder: str | Path | None, weights: Path, role: str):
    from transformers import CLIPTokenizer
    if folder is None:
        raise ModelLoadError(f"{role}: {weights} is a weights file without a tokenizer: give a CLIP tokenizer "
                             f"folder for it ({_tokenizer_arg(role)}; ComfyUI has one in comfy/sd1_tokenizer)")
    folder = Path(folder)
    if not folder.is_dir() or not _has_tokenizer(folder):
        raise ModelLoadError(f"{role}: tokenizer folder {folder} has no tokenizer.json or vocab.json + merges.txt: "
                             "give a CLIP tokenizer folder (ComfyUI has one in comfy/sd1_tokenizer)")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.eos_token_id is None or tok.bos_token_id is None:
        raise ModelLoadError(f"{role}: tokenizer folder {folder} has no start / end-of-text tokens: it is not a "
                             "CLIP tokenizer")
    return tok


def _tokenizer_arg(role: str) -> str:
    return f"SwittiText(tokenizer_{role[-1]}=...)" if role in ("clip_l", "clip_g") else "tokenizer=..."


# -- as a pipeline's text encoder ---------------------------------------------------------------------
def arch_of(path: str | Path, released: CLIPTextArch) -> CLIPTextArch:
    """The tower a folder's config.json describes (a smaller CLIP of the same kind, e.g. the tests'),
    else ``released``: a single weights file says nothing about heads or activation, so it must be
    the released tower (its shapes are checked when it loads)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return released
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return released                          # load_clip_text names the problem with the folder
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("text_config") or {}
    from transformers import CLIPTextConfig
    d = CLIPTextConfig()
    get = lambda k: cfg.get(k, getattr(d, k))    # noqa: E731
    found = CLIPTextArch(released.name, width=get("hidden_size"), layers=get("num_hidden_layers"),
                         heads=get("num_attention_heads"), mlp=get("intermediate_size"), activation=get("hidden_act"),
                         vocab=get("vocab_size"), positions=get("max_position_embeddings"), eps=get("layer_norm_eps"))
    return released if found == released else replace(found, name=f"a CLIP text tower {found.width} wide")


def load_switti_text(parts, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     offload: bool = False) -> SwittiText:
    """Switti's text encoder from what a user names: ``(clip_l, clip_g)`` or ``(clip_l, clip_g,
    tokenizer folder)`` (the tokenizer for towers given as single files, e.g. ComfyUI's
    clip_l.safetensors / clip_g.safetensors). ``dtype`` None: bf16, as the reference runs them."""
    parts = [parts] if isinstance(parts, (str, Path)) else list(parts or [])
    if len(parts) not in (2, 3) or not all(isinstance(p, (str, Path)) and str(p) for p in parts):
        raise ModelLoadError(f"Switti reads two text encoders: give clip_l and clip_g (folders or files, plus a CLIP "
                             f"tokenizer folder for files), e.g. text_encoder=('clip_l.safetensors', "
                             f"'clip_g.safetensors', 'sd1_tokenizer'); got {parts!r}")
    clip_l, clip_g = (Path(p).expanduser() for p in parts[:2])
    tokenizer = Path(parts[2]).expanduser() if len(parts) == 3 else None
    return SwittiText(clip_l, clip_g, tokenizer_l=tokenizer, tokenizer_g=tokenizer, device=device,
                      dtype=dtype or torch.bfloat16, offload=offload,
                      arch_l=arch_of(clip_l, CLIP_L), arch_g=arch_of(clip_g, CLIP_G))
