"""The VQ toy model's trainer (toyworld/train_vq.py): the trainable quantiser is the shipped one with
gradients, dead codes restart, and a tiny end-to-end run writes a file that loads as a Switti with
MiniLM text, pooled as the file says, and draws images."""
from __future__ import annotations

import torch

from svare_core.loader import load_pipeline
from svare_core.models.text import mean_pool
from svare_core.models.vqvae import VQVAE, VQVAEConfig
from svare_core.sampling import generate
from svare_core.toyworld import train_vq
from svare_core.toyworld.train import TOY_SCALES


def _tiny_vae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(vocab_size=16, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, num_phi=4,
                             stat_rows=3, norm_groups=4))


def test_trainable_quantiser_matches_the_shipped_one_and_reaches_every_part():
    vae = _tiny_vae()
    scales = [(1, 1), (2, 2), (4, 4)]
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    latent = vae.encode_latent(x)
    quantised, loss, used = train_vq.quantize_with_gradients(vae, latent, scales, beta=0.25)
    with torch.no_grad():
        indices, summed = vae.quantize_multiscale(latent, scales)
    assert torch.equal(used, torch.cat([i.reshape(-1) for i in indices]))
    # straight through: the forward value is the quantised sum, the gradient reaches the encoder
    torch.testing.assert_close(quantised, summed, rtol=0, atol=1e-6)
    (vae.decode(quantised).square().mean() + loss).backward()
    for name in ("quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight", "encoder.conv_in.conv.weight",
                 "decoder.conv_out.conv.weight"):
        grad = dict(vae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_only_unused_codes_restart_and_the_counts_reset():
    vae = _tiny_vae()
    before = vae.codebook.detach().clone()
    hits = torch.zeros(16)
    hits[[0, 3, 7]] = 5
    latent = torch.randn(2, 8, 4, 4)
    n = train_vq.restart_unused_codes(vae, hits, latent, torch.Generator().manual_seed(0))
    assert n == 13
    kept = torch.tensor([0, 3, 7])
    assert torch.equal(vae.codebook[kept], before[kept])
    moved = torch.ones(16, dtype=torch.bool)
    moved[kept] = False
    assert not torch.isclose(vae.codebook[moved], before[moved]).all(-1).any()
    assert hits.sum() == 0


def test_a_tiny_training_run_exports_a_loadable_switti(tmp_path, monkeypatch):
    tiny_vae = train_vq.toy_vqvae_config()
    tiny_vae.ch, tiny_vae.vocab_size = 8, 32
    tiny = train_vq.toy_switti_config()
    tiny.depth, tiny.embed_dim, tiny.num_heads, tiny.ffn_dim, tiny.vocab_size = 1, 32, 2, 64, 32
    monkeypatch.setattr(train_vq, "toy_vqvae_config", lambda: tiny_vae)
    monkeypatch.setattr(train_vq, "toy_switti_config", lambda: tiny)
    s = train_vq.VQTrainSettings(vae_steps=4, vae_batch=4, restart_every=2, num_images=40, steps=3, batch=4,
                                 warmup=1, threads=1)
    path = train_vq.train_all(tmp_path / "run", s, tmp_path / "model.safetensors")
    pipe = load_pipeline(path)
    assert pipe.family == "toyworld_vq" and pipe.transformer.token_kind == "vq"
    assert pipe.scales == list(TOY_SCALES)
    feats, mask, pooled = pipe.encode_prompts(["a red circle", "a dotted star on a gray background"])
    torch.testing.assert_close(pooled, mean_pool(feats, mask))
    res = generate(pipe, ["a red circle"], seed=1)
    assert res.images.shape == (1, 64, 64, 3)
    # resumable: a second call finds every stage done and exports the same weights
    again = train_vq.train_all(tmp_path / "run", s, tmp_path / "again.safetensors")
    a, b = load_pipeline(path).transformer.state_dict(), load_pipeline(again).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
