"""VQConfig.norm = "position": the VQ whose tokens see only their receptive field (the tokenizer-locality study),
in the official layout, written only when set, refused where it cannot be expressed."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from januskit.checkpoint.hf import janus_to_hf_config
from januskit.checkpoint.official_config import janus_from_official, janus_to_official
from januskit.config import ConfigError, VQConfig, preset
from januskit.models.vq import AffineOnly, PositionNorm, VQModel
from januskit.train.pretrain.vq import hold_attention_at_identity

SMALL = VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1,
                 image_size=64)


def model(norm: str, seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(dataclasses.replace(SMALL, norm=norm)).eval()


def test_position_norm_keeps_the_layout_and_normalises_each_position():
    g, p = model("group"), model("position")
    assert {k: v.shape for k, v in g.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}
    norms = [m for m in p.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, PositionNorm) for m in norms)
    assert not any(isinstance(m, PositionNorm) for m in g.modules())
    b = model("branch")
    assert isinstance(b.encoder.norm_out, AffineOnly) and isinstance(b.decoder.norm_out, AffineOnly)
    assert isinstance(b.encoder.mid[0].norm1, PositionNorm) and isinstance(p.decoder.norm_out, PositionNorm)
    x = torch.randn(1, b.decoder.norm_out.num_channels, 3, 3)
    w, bias = b.decoder.norm_out.weight, b.decoder.norm_out.bias
    torch.testing.assert_close(b.decoder.norm_out(x), x * w.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    n = norms[0]
    with torch.no_grad():
        n.weight.uniform_(0.5, 1.5)
        n.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, n.num_channels, 5, 7)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + n.eps) * n.weight.view(1, -1, 1, 1) + n.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(n(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="VQConfig.norm: 'layer' is not one of group, position, branch"):
        VQModel(dataclasses.replace(SMALL, norm="layer"))


@torch.no_grad()
def test_only_position_norm_without_attention_keeps_far_latents_unchanged():
    """A change in the top-left corner: with position norms and the attention blocks at the identity, latents
    beyond the convolutions' receptive field do not move at all; GroupNorm alone or attention alone moves them."""
    x = F.interpolate(torch.rand(1, 3, 8, 8) * 2 - 1, size=64, mode="nearest")
    y = x.clone()
    y[..., :6, :6] = -1.0

    def far_change(m: VQModel) -> float:
        a, b = (m.encode_latent(t)[..., 16:, 16:] for t in (x, y))
        return (a - b).abs().max().item()

    for norm in ("position", "branch"):
        m = model(norm)
        assert hold_attention_at_identity(m) == 5
        assert far_change(m) == 0.0, norm
    local = model("position")
    hold_attention_at_identity(local)
    near = local.encode_latent(x)[..., :3, :3] - local.encode_latent(y)[..., :3, :3]
    assert near.abs().max() > 1e-3  # the corner's own latents do change
    grouped = model("group")
    hold_attention_at_identity(grouped)
    assert far_change(grouped) > 1e-3  # GroupNorm's statistics span the image
    assert far_change(model("position")) > 1e-3  # and so does attention


def test_norm_is_written_only_when_set_and_read_back():
    c = preset("tiny-janus-pro")
    assert "norm" not in janus_to_official(c)["gen_vision_config"]["params"]
    local = dataclasses.replace(c, vq=dataclasses.replace(c.vq, norm="position"))
    cfg = janus_to_official(local)
    assert cfg["gen_vision_config"]["params"]["norm"] == "position"
    assert janus_from_official(cfg).vq == local.vq
    cfg["gen_vision_config"]["params"]["norm"] = "batch"
    with pytest.raises(ConfigError, match=r"config.json: gen_vision_config.params.norm 'batch' is not one of "
                                          r"group, position, branch"):
        janus_from_official(cfg)
    with pytest.raises(ConfigError, match="the VQ's norm 'position' .* has no HF counterpart"):
        janus_to_hf_config(local, image_token_id=3)
