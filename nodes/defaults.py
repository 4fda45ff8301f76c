"""Widget defaults of the nodes, in one place. Sampling and erasure values come from svare_core.defaults
(tuned for the bundled toy model); Infinity users change them as docs/nodes.md says."""
from svare_core.defaults import TOY_ERASE, TOY_SAMPLER

SAMPLER = {
    "prompt": "a striped red star on a black background",
    "cfg": float(TOY_SAMPLER.cfg), "tau": TOY_SAMPLER.tau, "top_p": TOY_SAMPLER.top_p, "top_k": TOY_SAMPLER.top_k,
    "aspect_ratio": "1:1", "resolution": "1M", "batch_size": 1, "seed": 0,
}
ERASE = {
    "concept": "striped", "anchor": "solid", "kind": "toy", "method": TOY_ERASE.method,
    "steps": TOY_ERASE.steps, "learning_rate": TOY_ERASE.lr, "trainable": TOY_ERASE.trainable,
    "lora_rank": TOY_ERASE.lora_rank, "preservation_weight": TOY_ERASE.preservation_weight,
    "teacher_cfg": TOY_ERASE.teacher_cfg, "seed": 0,
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
    """ComfyUI seeds go up to 2**64-1; torch generators take the seed plus an image index."""
    return int(seed) % (2**63 - 2**16)
