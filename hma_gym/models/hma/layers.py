"""The trunk's building blocks: attention within a frame and across frames (RoPE over frame indices),
the MLP, and the block that modulates both with the frame's action (adaLN-Zero)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hma_gym.models.hma.config import HMAConfig


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def rope_table(pos: Tensor, hd: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for absolute frame indices pos (B, F): each (B, 1, 1, F, hd/2),
    float32 (no buffer, so model.to(bfloat16) cannot degrade them). One table serves every layer."""
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd)
    angles = pos.to(torch.float32)[:, None, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def rope(x: Tensor, pos: Tensor, table: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rotary position embedding over frames. x: (..., B, N, H, F, hd), pos: (B, F) absolute frame indices
    (or their precomputed ``rope_table``)."""
    cos, sin = table if table is not None else rope_table(pos, x.shape[-1])
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attend_past_and_self(
    q: Tensor, k: Tensor, v: Tensor, k_past: Tensor, v_past: Tensor, past_mask: Tensor, dropout: float = 0.0
) -> Tensor:
    """Each query attends to the allowed past keys plus its own key (always allowed).

    q, k, v: (..., F, hd); k_past, v_past: (..., P, hd); past_mask: bool, broadcastable to (..., F, P).
    One F x P score matrix plus the diagonal self score, one softmax over their concatenation.
    """
    scale = q.shape[-1] ** -0.5
    k_past, v_past = k_past.to(q.dtype), v_past.to(q.dtype)  # a cache may be stored in another dtype
    s_past = (q @ k_past.transpose(-2, -1)) * scale  # (..., F, P)
    s_past = s_past.float().masked_fill(~past_mask, float("-inf"))
    s_self = (q * k).sum(-1, keepdim=True).float() * scale  # (..., F, 1)
    p = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).to(q.dtype)  # (..., F, P + 1)
    p = F.dropout(p, dropout) if dropout > 0 else p
    return p[..., :-1] @ v_past + p[..., -1:] * v  # (..., F, hd)


class SpatialAttention(nn.Module):
    """Bidirectional attention over the N tokens of each frame."""

    def __init__(self, config: HMAConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, Fr, N, D = x.shape
        q, k, v = self.qkv(x.reshape(B * Fr, N, D)).unflatten(-1, (3, self.n_head, -1)).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B*F, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, Fr, N, D)
        return self.proj(y)


class TemporalAttention(nn.Module):
    """Attention across frames, separately for each of the N token slots, with RoPE over frame indices.

    Frames ``[:n_clean]`` form a clean stream with ordinary causal attention. Any further frames
    ("queries", e.g. the masked stream) each attend to the clean frames with a smaller frame index
    plus themselves. With ``past`` (a cache layer: keys, values, valid-slot mask) every frame
    attends to the cached frames plus itself instead.
    """

    def __init__(self, config: HMAConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(
        self, x: Tensor, pos: Tensor, n_clean: int, past: tuple[Tensor, Tensor, Tensor] | None = None,
        table: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, Fr, N, D = x.shape
        dropout = self.dropout if self.training else 0.0
        qkv = self.qkv(x.transpose(1, 2))  # (B, N, F, 3D)
        qkv = qkv.unflatten(-1, (3, self.n_head, -1)).permute(3, 0, 1, 4, 2, 5)  # (3, B, N, H, F, hd)
        q, k = rope(qkv[:2], pos, table).unbind(0)  # one rotation for queries and keys
        v = qkv[2]
        if past is not None:
            k_past, v_past, valid = past  # (B, N, H, W, hd), (B, N, H, W, hd), (B, W)
            y = attend_past_and_self(q, k, v, k_past, v_past, valid[:, None, None, None, :], dropout)
        else:
            qc, kc, vc = (t[..., :n_clean, :].flatten(0, 1) for t in (q, k, v))  # (B*N, H, Tc, hd)
            yc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, dropout_p=dropout)
            y = yc.unflatten(0, (B, N))  # (B, N, H, Tc, hd)
            if Fr > n_clean:
                qm, km, vm = (t[..., n_clean:, :] for t in (q, k, v))  # (B, N, H, Tm, hd)
                earlier = pos[:, None, :n_clean] < pos[:, n_clean:, None]  # (B, Tm, Tc) strictly-causal
                ym = attend_past_and_self(
                    qm, km, vm, k[..., :n_clean, :], v[..., :n_clean, :], earlier[:, None, None], dropout
                )
                y = torch.cat([y, ym], dim=3)  # (B, N, H, F, hd)
        y = y.permute(0, 3, 1, 2, 4).reshape(B, -1, N, D)
        return self.proj(y), (k, v)

    def kv(self, x: Tensor, pos: Tensor, table: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Only the keys and values ``forward`` would return (no queries, no attention): what a cache
        append needs from the last layer."""
        D = x.shape[-1]
        kv = F.linear(x.transpose(1, 2), self.qkv.weight[D:], self.qkv.bias[D:])  # (B, N, F, 2D)
        k, v = kv.unflatten(-1, (2, self.n_head, -1)).permute(3, 0, 1, 4, 2, 5)  # each (B, N, H, F, hd)
        return rope(k, pos, table), v


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.proj = nn.Linear(d_hidden, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Spatial attention -> causal temporal attention -> MLP, each pre-norm with per-frame adaLN-Zero."""

    def __init__(self, config: HMAConfig):
        super().__init__()
        D = config.d_model
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.spatial = SpatialAttention(config)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.temporal = TemporalAttention(config)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(D, int(config.mlp_ratio * D), D, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # shift, scale, gate for each of the three sub-layers
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 9 * D))

    def forward(
        self, x: Tensor, c: Tensor, pos: Tensor, n_clean: int, past: tuple[Tensor, Tensor, Tensor] | None,
        kv_only: bool = False, table: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, F, N, D), c: (B, F, D): one modulation per frame, shared by its N tokens.
        ``kv_only``: stop at the temporal keys/values (returned x is the input of the temporal sub-layer's
        residual, not the block's output). ``table``: ``rope_table(pos)``, shared by the layers."""
        mods = self.ada(c).unsqueeze(2).chunk(9, dim=-1)  # 9 x (B, F, 1, D)
        sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3 = mods
        x = x + g1 * self.resid_dropout(self.spatial(modulate(self.norm1(x), sh1, sc1)))
        if kv_only:
            return x, self.temporal.kv(modulate(self.norm2(x), sh2, sc2), pos, table)
        y, kv = self.temporal(modulate(self.norm2(x), sh2, sc2), pos, n_clean, past, table)
        x = x + g2 * self.resid_dropout(y)
        x = x + g3 * self.mlp(modulate(self.norm3(x), sh3, sc3))
        return x, kv


def init_weights(module: nn.Module) -> None:
    """GPT-2 style: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
