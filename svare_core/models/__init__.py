"""Model code: the Infinity transformer, the BSQ VAE, text encoders, and checkpoint loading."""
from .infinity import Infinity, InfinityConfig, infinity_2b, infinity_8b
from .loading import ModelLoadError, inspect_file, load_transformer, load_vae
from .vae import BSQVAE, VAEConfig, vae_d32, vae_d56_patchify

__all__ = ["Infinity", "InfinityConfig", "BSQVAE", "VAEConfig", "ModelLoadError", "inspect_file",
           "load_transformer", "load_vae", "infinity_2b", "infinity_8b", "vae_d32", "vae_d56_patchify"]
