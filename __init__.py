"""svare: ComfyUI node pack for VAR text-to-image models and S-VARE concept erasure.

ComfyUI imports this folder as a package named after the folder (not on sys.path). The nodes import
the core library ``svare_core``, which lives in this folder, so the folder is appended to sys.path
(at the end, so nothing of ComfyUI or other packs is shadowed; an installed svare_core wins).
The node package is imported relatively: ComfyUI has its own top-level module named ``nodes``.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

# The frontend extension (web/svare.js): Save Erasure Patch shows where it saved.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
