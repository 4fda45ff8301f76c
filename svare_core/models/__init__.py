"""Model code: the Infinity transformer, the BSQ VAE, text encoders, and the registry of
architectures that recognises and loads checkpoints (registry.py; one arch_*.py per architecture)."""
from .infinity import Infinity, InfinityConfig, infinity_2b, infinity_8b
from .checkpoint import ModelLoadError
from .registry import inspect_file, load_transformer, load_vae
from .vae import BSQVAE, VAEConfig, vae_d32, vae_d56_patchify

__all__ = ["Infinity", "InfinityConfig", "BSQVAE", "VAEConfig", "ModelLoadError", "inspect_file",
           "load_transformer", "load_vae", "infinity_2b", "infinity_8b", "vae_d32", "vae_d56_patchify"]
