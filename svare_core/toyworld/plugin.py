"""The toy world as a plug-in of the generic engine: its bundled model, default settings,
prompt pairs, preservation prompts, evaluation and detector (see svare_core.plugins)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights" / "toyworld.safetensors"


def register(registry) -> None:
    registry.add("bundled_model", "toyworld", WEIGHTS)
