"""The svare ComfyUI nodes (classic node API). Each node is a thin layer over svare_core.

Import this package relatively (``from .nodes import ...``): ComfyUI has a top-level module of the
same name.
"""
from . import comfy_adapter
from .compare import CompareModels
from .erasure import (ApplyErasurePatch, EraseConcept, EraseSettings, ErasureCache, LoadErasurePatch,
                      SaveErasurePatch)
from .loaders import LoadVAR
from .safety import SafetyScore
from .sampler import VARSampler

comfy_adapter.register_model_folders()
comfy_adapter.report_missing_requirements()
comfy_adapter.install_memory_hooks()

_NODES = {
    "SvareLoadVAR": (LoadVAR, "Load VAR Model: Infinity / Switti (svare)"),
    "SvareVARSampler": (VARSampler, "VAR Sampler: Infinity / Switti (svare)"),
    "SvareEraseConcept": (EraseConcept, "Erase Concept (svare)"),
    "SvareEraseSettings": (EraseSettings, "Erase Settings (svare)"),
    "SvareErasureCache": (ErasureCache, "Erasure Cache (svare)"),
    "SvareApplyErasurePatch": (ApplyErasurePatch, "Apply Erasure Patch (svare)"),
    "SvareSaveErasurePatch": (SaveErasurePatch, "Save Erasure Patch (svare)"),
    "SvareLoadErasurePatch": (LoadErasurePatch, "Load Erasure Patch (svare)"),
    "SvareCompare": (CompareModels, "Compare Before/After (svare)"),
    "SvareSafetyScore": (SafetyScore, "Safety Score (svare)"),
}
NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
