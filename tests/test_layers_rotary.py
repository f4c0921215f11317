"""get_rope against HF's Llama rotary embedding for each rope type, plus partial and GPT-J styles."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from porter.engine.layers.rotary import get_rope

HEADS, HD, MAXPOS = 3, 16, 128

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                 "short_factor": [1.0 + 0.1 * i for i in range(HD // 2)],
                 "long_factor": [2.0 + 0.3 * i for i in range(HD // 2)]},
    "proportional": {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


def _hf(rope_parameters, positions, q, k):
    cfg = LlamaConfig(hidden_size=HEADS * HD, num_attention_heads=HEADS, head_dim=HD,
                      max_position_embeddings=MAXPOS, rope_parameters=dict(rope_parameters))
    rot = LlamaRotaryEmbedding(cfg)
    cos, sin = rot(q, positions[None])
    qh = q.view(1, -1, HEADS, HD).transpose(1, 2)
    kh = k.view(1, -1, HEADS, HD).transpose(1, 2)
    qo, ko = apply_rotary_pos_emb(qh, kh, cos, sin)
    return qo.transpose(1, 2).reshape(q.shape), ko.transpose(1, 2).reshape(k.shape)


@pytest.mark.parametrize("name", list(ROPES))
def test_matches_hf(name):
    torch.manual_seed(0)
    # longrope: HF uses the short factors while the sequence fits original_max_position_embeddings
    top = 64 if name == "longrope" else MAXPOS
    positions = torch.randint(0, top, (20,))
    q, k = torch.randn(20, HEADS * HD), torch.randn(20, HEADS * HD)
    rope = get_rope(HD, MAXPOS, is_neox_style=True, rope_parameters=ROPES[name], dtype=torch.float32)
    qo, ko = rope(positions, q, k)
    hq, hk = _hf(ROPES[name], positions, q, k)
    torch.testing.assert_close(qo, hq)
    torch.testing.assert_close(ko, hk)
    # 3-D input gives the same result
    q3, _ = rope(positions, q.view(20, HEADS, HD), None)
    assert q3.shape == (20, HEADS, HD)
    torch.testing.assert_close(q3.reshape(20, -1), qo)


def test_scaled_types_differ_from_default():
    positions = torch.arange(100, 110)
    q = torch.randn(10, HD)
    base = get_rope(HD, MAXPOS, rope_parameters=ROPES["default"])(positions, q)[0]
    for name in ("linear", "yarn", "llama3"):
        assert not torch.allclose(get_rope(HD, MAXPOS, rope_parameters=ROPES[name])(positions, q)[0], base)


def _complex_reference(x, positions, rotary_dim, base, interleaved):
    """Rotate the first rotary_dim channels per head by position * theta_i as complex multiplication."""
    t = x.shape[0]
    x = x.view(t, -1, HD)
    rot = x[..., :rotary_dim].double()
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    ang = positions.double()[:, None] * inv[None]
    if interleaved:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        z = torch.complex(rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:])
    z = z * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    if interleaved:
        out = torch.stack([z.real, z.imag], -1).flatten(-2)
    else:
        out = torch.cat([z.real, z.imag], -1)
    return torch.cat([out.float(), x[..., rotary_dim:]], -1).reshape(t, -1)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_styles_and_partial_rotary(neox, partial):
    torch.manual_seed(1)
    positions = torch.randint(0, MAXPOS, (7,))
    q = torch.randn(7, HEADS * HD)
    rope = get_rope(HD, MAXPOS, is_neox_style=neox,
                    rope_parameters={"rope_theta": 1000.0, "partial_rotary_factor": partial})
    assert rope.rotary_dim == int(HD * partial)
    out, _ = rope(positions, q)
    ref = _complex_reference(q, positions, rope.rotary_dim, 1000.0, interleaved=not neox)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if partial < 1:
        torch.testing.assert_close(out.view(7, HEADS, HD)[..., rope.rotary_dim:],
                                   q.view(7, HEADS, HD)[..., rope.rotary_dim:], rtol=0, atol=0)


def test_cache_extends_past_max_position():
    rope = get_rope(HD, 16, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.tensor([3, 40])
    q = torch.randn(2, HD)
    out, _ = rope(positions, q)
    assert rope.cos_sin_cache.shape[0] >= 41
    torch.testing.assert_close(out, _complex_reference(q, positions, HD, 10000.0, False), atol=1e-5, rtol=1e-5)


def test_bad_parameters():
    with pytest.raises(ValueError, match="nested by layer type"):
        get_rope(HD, MAXPOS, rope_parameters={"full_attention": {"rope_theta": 1e6}, "sliding_attention": {}})
    with pytest.raises(ValueError, match="unknown rope_type 'nope'"):
        get_rope(HD, MAXPOS, rope_parameters={"rope_type": "nope", "rope_theta": 1.0})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        get_rope(HD, MAXPOS, rope_parameters={"partial_rotary_factor": 0.0})
