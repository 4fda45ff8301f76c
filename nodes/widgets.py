"""Initial widget values of the nodes, in one place.

Settings that depend on the model (sampling and erasure) start at "auto": the node resolves them
from the loaded model's family (svare_core.settings), so one workflow fits the toy model and
Infinity alike; a value the user types overrides the family's.
"""
AUTO = "auto"

SAMPLER = {
    "prompt": "a striped red star on a black background",
    "cfg": 0.0, "tau": 0.0, "top_p": -1.0, "top_k": 0,      # 0 / 0 / -1: the model's own (auto)
    "aspect_ratio": "1:1", "resolution": "1M", "batch_size": 1, "seed": 0,
}
# 0 (and -1 for preservation_weight, where 0 means "off") stands for the family's value.
ERASE = {
    "concept": "striped", "anchor": "solid", "kind": AUTO, "method": "svare",
    "steps": 0, "learning_rate": 0.0, "trainable": AUTO, "lora_rank": 0, "preservation_weight": -1.0,
    "teacher_cfg": 0.0, "seed": 0,
}
APPLY = {"strength": 1.0}
COMPARE = {
    "prompts": "a striped red star on a black background\na striped blue circle on a gray background\n"
               "a solid green heart on a black background",
    "seed": 0, "cfg": SAMPLER["cfg"], "tau": SAMPLER["tau"], "top_p": SAMPLER["top_p"], "resolution": "0.25M",
}
LOADER = {"precision": "fp32", "device": "auto", "offload_text_encoder": True, "offload_vae": False}
SAFETY = {"detector": "toyworld", "concept": "red", "threshold": 0.5, "censor": True}
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def core_seed(seed: int) -> int:
    """ComfyUI seeds go up to 2**64-1; the core takes seeds below MAX_SEED (seed + image index)."""
    from svare_core.sampling import MAX_SEED

    return int(seed) % (MAX_SEED - 1024)
