"""HMA: a spatial-temporal masked-autoregressive world model over discrete image tokens.

Heterogeneous Masked Autoregression (paper sections 3-4). Every frame t is one row of

    N = grid*grid image tokens (o_t) + n_action_tokens (from a_{t-1}) + 1 state token (s_t)

tokens. The trunk alternates bidirectional attention inside a frame (spatial) with causal
attention across frames for each of the N slots (temporal, RoPE over the frame index); the
action that led into frame t also modulates every sub-layer of frame t (DiT adaLN-Zero).
Action/state stems and heads are per embodiment, so one trunk serves robots with different
action and state sizes; a batch may mix them.

Training ("two streams"): a clean stream (everything visible) runs causally through the
trunk, and a masked stream in which the predicted frames are partly [MASK]ed. In every
temporal layer the masked copy of frame t attends to the clean keys/values of frames < t
and to its own key/value: exactly what key/value-cached generation sees, where the past
frames are known and the current frame is being unmasked. One masking objective covers
forward dynamics, full dynamics, passive video and policy (``OBJECTIVES``).

Inference keeps a per-layer temporal key/value ring buffer of the last ``max_frames - 1``
frames (``HMACache``), so a generated frame costs the same at frame 10 and at frame 10,000:

    cache = model.new_cache(n_envs)
    model.append_frame(cache, tokens0, state0, None, embodiment_ids)
    for t in ...:
        tokens, state = model.generate_frame(cache, action, embodiment_ids, generator=g)
        model.append_frame(cache, tokens, state, action, embodiment_ids)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hma_gym.models.tokenizer import fsq_codes_to_index, index_to_codes

__all__ = [
    "OBJECTIVES",
    "EmbodimentSpec",
    "HMAConfig",
    "HMA",
    "HMACache",
    "HMA_PRESETS",
    "make_hma",
    "sample_image_mask",
]

OBJECTIVES = ("forward", "full", "passive", "policy")
"""Masking objectives, see ``HMA.forward``."""

IMAGE_HEADS = ("maskgit", "mar")
"""Image heads of ``HMAConfig.head``."""

# how the action slot of a frame is filled
ACTION_NONE, ACTION_VISIBLE, ACTION_MASKED = 0, 1, 2


# ----------------------------------------------------------------------------- config


@dataclass
class EmbodimentSpec:
    """Sizes of one robot's (normalised) action and low-dimensional state vectors."""

    action_dim: int
    state_dim: int

    def __post_init__(self) -> None:
        if int(self.action_dim) < 1:
            raise ValueError(f"action_dim must be >= 1. Got {self.action_dim=}")
        if int(self.state_dim) < 1:
            raise ValueError(f"state_dim must be >= 1. Got {self.state_dim=}")
        self.action_dim, self.state_dim = int(self.action_dim), int(self.state_dim)


def _default_objective_probs() -> dict[str, float]:
    return {"forward": 0.7, "full": 0.1, "passive": 0.1, "policy": 0.1}


@dataclass
class HMAConfig:
    vocab_size: int = 1000
    """Number of image token codes (the FSQ codebook size)."""
    grid: int = 16
    """Side of the square image-token grid of one frame."""
    patch_size: int = 1
    """Image tokens grouped patch_size x patch_size into one trunk token (the paper uses 2): each trunk
    token embeds its group's codes (one embedding table per position in the group) and predicts all of
    them, so the trunk sees patch_size**2 times fewer image tokens per frame."""
    n_action_tokens: int = 4
    """Action tokens per frame, made by the embodiment's action stem from a_{t-1}."""
    d_model: int = 192
    """Width of the trunk."""
    n_layer: int = 6
    """Number of (spatial, temporal, MLP) blocks."""
    n_head: int = 6
    """Attention heads; d_model / n_head must be even (RoPE)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of d_model."""
    max_frames: int = 12
    """Training context in frames; inference attends to the last max_frames - 1 frames plus the current."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    min_mask_ratio: float = 0.05
    """Smallest fraction of image tokens masked in a predicted frame (MaskGIT cosine schedule above it)."""
    objective_probs: dict[str, float] = field(default_factory=_default_objective_probs)
    """Probability of each masking objective per sample (missing ones are 0; normalised to sum to 1)."""
    state_loss_weight: float = 1.0
    """Weight of the state MSE next to the image cross-entropy."""
    action_loss_weight: float = 1.0
    """Weight of the action MSE ("full" and "policy" objectives)."""
    embodiments: dict[str, EmbodimentSpec] = field(default_factory=dict)
    """Robots by name; each gets its own action/state stems and heads."""
    head: str = "maskgit"
    """Image head: "maskgit" (discrete codes, cross-entropy, sampled from logits) or "mar" (continuous
    latents, "soft tokens", a per-token diffusion MLP conditioned on the trunk output, as in MAR)."""
    latent_dim: int = 4
    """mar: channels of one latent cell (the tokenizer's pre-quantisation channels); a trunk token holds
    patch_size**2 cells."""
    latent_scale: float = 0.5
    """mar: latents are multiplied by this before the diffusion head (about unit variance)."""
    latent_levels: tuple[int, ...] = ()
    """mar: the tokenizer's FSQ levels: the trunk embeds latents rounded to the FSQ lattice, as the codes
    they round to (``LatticeTable``, exactly as a MaskGIT trunk embeds codes); the head still predicts
    (and the env still decodes) continuous latents. Empty: one linear layer embeds the latents."""
    diff_width: int = 256
    """mar: width of the diffusion MLP."""
    diff_depth: int = 3
    """mar: residual adaLN blocks of the diffusion MLP."""
    diff_train_steps: int = 1000
    """mar: diffusion steps of the noise schedule (training)."""
    diff_sample_steps: int = 10
    """mar: DDIM steps per token at generation (a keyword of ``generate_frame`` too)."""
    diff_batch_mul: int = 4
    """mar: noise draws per masked token and training step (MAR's diffusion batch multiplier)."""
    code_levels: tuple[int, ...] = ()
    """maskgit: the tokenizer's FSQ levels, for a factorised image head: a code embeds as the sum of one
    learned vector per (channel, level) and the head predicts each channel's level with its own softmax
    (sum(levels) logits a token instead of prod(levels) = vocab_size), the code's probability being the
    product. Keeps large FSQ codebooks (e.g. 8 8 8 6 5 = 15,360 codes) cheap. Empty: one softmax over
    the codes."""

    def __post_init__(self) -> None:
        # from_dict / JSON give plain dicts
        self.embodiments = {
            name: spec if isinstance(spec, EmbodimentSpec) else EmbodimentSpec(**spec)
            for name, spec in self.embodiments.items()
        }
        self.objective_probs = {k: float(v) for k, v in self.objective_probs.items()}
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2. Got {self.vocab_size=}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1. Got {self.grid=}")
        if self.patch_size < 1 or self.grid % self.patch_size != 0:
            raise ValueError(f"patch_size must divide grid. Got {self.patch_size=}, {self.grid=}")
        if self.n_action_tokens < 1:
            raise ValueError(f"n_action_tokens must be >= 1. Got {self.n_action_tokens=}")
        if self.n_layer < 1:
            raise ValueError(f"n_layer must be >= 1. Got {self.n_layer=}")
        if self.n_head < 1 or self.d_model < 1 or self.d_model % self.n_head != 0:
            raise ValueError(f"d_model must be a positive multiple of n_head. Got {self.d_model=}, {self.n_head=}")
        if (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(f"head dim d_model / n_head must be even for RoPE. Got {self.d_model=}, {self.n_head=}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive. Got {self.mlp_ratio=}")
        if self.max_frames < 2:
            raise ValueError(f"max_frames must be >= 2 (a prompt and a predicted frame). Got {self.max_frames=}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Got {self.dropout=}")
        if not 0.0 <= self.min_mask_ratio <= 1.0:
            raise ValueError(f"min_mask_ratio must be in [0, 1]. Got {self.min_mask_ratio=}")
        unknown = sorted(set(self.objective_probs) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"objective_probs has unknown objectives {unknown}; known: {OBJECTIVES}")
        if any(p < 0 for p in self.objective_probs.values()) or sum(self.objective_probs.values()) <= 0:
            raise ValueError(f"objective_probs must be >= 0 with a positive sum. Got {self.objective_probs=}")
        if self.state_loss_weight < 0:
            raise ValueError(f"state_loss_weight must be >= 0. Got {self.state_loss_weight=}")
        if self.action_loss_weight < 0:
            raise ValueError(f"action_loss_weight must be >= 0. Got {self.action_loss_weight=}")
        for name in self.embodiments:
            _check_embodiment_name(name)
        if self.head not in IMAGE_HEADS:
            raise ValueError(f"head must be one of {IMAGE_HEADS}. Got {self.head=}")
        if self.head == "mar" and min(self.latent_dim, self.diff_width, self.diff_depth, self.diff_train_steps,
                                      self.diff_sample_steps, self.diff_batch_mul) < 1:
            raise ValueError("latent_dim, diff_width, diff_depth, diff_train_steps, diff_sample_steps and "
                             "diff_batch_mul must be >= 1")
        if self.latent_scale <= 0:
            raise ValueError(f"latent_scale must be positive. Got {self.latent_scale=}")
        self.latent_levels = tuple(int(v) for v in self.latent_levels)
        self.code_levels = tuple(int(v) for v in self.code_levels)
        if self.code_levels:
            if self.head != "maskgit":
                raise ValueError(f"code_levels (the factorised head) is for the maskgit head. Got {self.head=}")
            if min(self.code_levels) < 2 or math.prod(self.code_levels) != self.vocab_size:
                raise ValueError(f"code_levels must be levels >= 2 whose product is vocab_size. Got "
                                 f"{self.code_levels=} (product {math.prod(self.code_levels)}), {self.vocab_size=}")
        if self.latent_levels and (len(self.latent_levels) != self.latent_dim or min(self.latent_levels) < 2):
            raise ValueError(f"latent_levels must give latent_dim levels, each >= 2. Got {self.latent_levels=}, "
                             f"{self.latent_dim=}")

    @property
    def soft(self) -> bool:
        """True for the continuous ("mar") variant: image tokens are float latents (..., latent_dim)."""
        return self.head == "mar"

    @property
    def factorized(self) -> bool:
        """True when the maskgit head predicts each FSQ channel separately (``code_levels``)."""
        return bool(self.code_levels)

    @property
    def head_classes(self) -> int:
        """Logits per image token of the maskgit head: sum(code_levels) if factorised, else vocab_size."""
        return sum(self.code_levels) if self.code_levels else self.vocab_size

    @property
    def image_slots(self) -> int:
        """Trunk tokens that carry the image of one frame: (grid / patch_size) ** 2."""
        return (self.grid // self.patch_size) ** 2

    @property
    def tokens_per_frame(self) -> int:
        return self.image_slots + self.n_action_tokens + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``HMAConfig.from_dict(cfg.to_dict()) == cfg``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HMAConfig:
        d = dict(d)
        # keys of removed options, still in older configs (the shipped checkpoints' among them): read
        # where they hold the value that meant "off", refused otherwise
        hidden = d.pop("latent_in_hidden", 0)
        if hidden:
            raise ValueError(f"latent_in_hidden={hidden}: the MLP latent input was removed (issue 27; no shipped "
                             "model used it). A mar model embeds latents with one linear layer or latent_levels")
        if not d.pop("round_latent_input", True) and d.get("latent_levels"):
            raise ValueError("latent_levels with round_latent_input false: the interpolating lattice input was "
                             "removed (issue 27; no shipped model used it). latent_levels now always rounds")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HMAConfig fields {unknown}")
        return cls(**d)


def _check_embodiment_name(name: str) -> None:
    # names become nn.ModuleDict keys (state-dict prefixes)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"embodiment names must be non-empty strings without '.'. Got {name=}")


# ----------------------------------------------------------------------------- building blocks


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


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None, order: Tensor | None = None) -> Tensor:
    """One draw from each row of probs (N, V) (non-negative, rows need not sum to 1) -> (N,) long.

    Inverse-CDF sampling: one uniform per row against the row's cumulative sums. The same distribution
    as ``torch.multinomial(probs, 1)``, which on CPU draws an exponential variate for every entry of
    every row (N x V of them) and was a fifth of a learned-env step; this draws N. The cumulative sum
    runs in two levels (over blocks of about sqrt(V) entries, then within the chosen block), which
    picks the same index as one cumulative sum over V up to float rounding at ~10x fewer serial adds.
    order (N,) long: row i is the order[i]-th of the N draws (the uniforms are drawn in draw order), so
    rows handed over permuted get the uniforms they would get unpermuted.
    """
    probs = probs.float()
    N, V = probs.shape
    u = torch.rand(N, 1, device=probs.device, generator=generator)
    if order is not None:
        u = u[order]
    size = _block_size(V)
    n_blocks = -(-V // size)
    if n_blocks * size != V:
        probs = F.pad(probs, (0, n_blocks * size - V))
    blocks = probs.reshape(N, n_blocks, size)
    block_mass = blocks.sum(-1)  # (N, n_blocks)
    block_cdf = block_mass.cumsum(-1)
    u = u * block_cdf[:, -1:]
    # the first block whose cumulative mass exceeds u, then the first entry of it whose running sum
    # exceeds what is left of u: index i with probability probs[i] / sum
    b = torch.searchsorted(block_cdf, u, right=True).clamp_(max=n_blocks - 1)  # (N, 1)
    inner = blocks[torch.arange(N, device=probs.device), b[:, 0]].cumsum(-1)  # (N, size)
    # rounding can put the rest of u just outside [0, the block's sum): keep it inside, so only an
    # entry of positive probability can be picked
    rest = (u - (block_cdf.gather(1, b) - block_mass.gather(1, b))).clamp_(min=0)
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 2**-20))
    j = torch.searchsorted(inner, rest, right=True).clamp_(max=size - 1)
    return (b * size + j).squeeze(-1)


def _block_size(V: int) -> int:
    """Block length of sample_categorical's two-level sum: a divisor of V near sqrt(V) (no padding),
    else sqrt(V) rounded up."""
    root = math.isqrt(V)
    for size in range(root, max(root // 2, 1) - 1, -1):
        if V % size == 0 and size > 1:
            return size
    return max(root + (root * root < V), 1)


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


class ActionStem(nn.Module):
    """a_{t-1} (..., action_dim) -> action tokens (..., n_tokens, D) and adaLN conditioning (..., D)."""

    def __init__(self, action_dim: int, d_model: int, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.to_tokens = MLP(action_dim, d_model, n_tokens * d_model)
        self.to_cond = MLP(action_dim, d_model, d_model)

    def forward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        return self.to_tokens(a).unflatten(-1, (self.n_tokens, -1)), self.to_cond(a)


class EmbodimentModules(nn.Module):
    """Everything one robot owns: action stem, state stem, action head, state head."""

    def __init__(self, spec: EmbodimentSpec, config: HMAConfig):
        super().__init__()
        D, n = config.d_model, config.n_action_tokens
        self.action_stem = ActionStem(spec.action_dim, D, n)
        self.state_stem = nn.Linear(spec.state_dim, D)
        self.action_norm = nn.LayerNorm(D)
        self.action_head = MLP(n * D, D, spec.action_dim)  # from the n action-token outputs
        self.state_norm = nn.LayerNorm(D)
        self.state_head = MLP(D, D, spec.state_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(_init_weights)
        # paper 3.5: Xavier with gain 0.1 on the action projectors, for stability
        for layer in (self.action_stem.to_tokens.proj, self.action_stem.to_cond.proj):
            nn.init.xavier_uniform_(layer.weight, gain=0.1)

    def predict_action(self, h: Tensor) -> Tensor:
        """h: (..., n_action_tokens, D) trunk outputs -> (..., action_dim)."""
        return self.action_head(self.action_norm(h).flatten(-2))

    def predict_state(self, h: Tensor) -> Tensor:
        """h: (..., D) trunk output of the state token -> (..., state_dim)."""
        return self.state_head(self.state_norm(h))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of diffusion steps t (K,) -> (K, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin(), torch.zeros_like(args[:, : dim % 2])], dim=-1)


class DiffusionMLP(nn.Module):
    """MAR's per-token denoiser: noisy token x_t (K, dim), step t (K,), trunk output z (K, cond_dim) ->
    predicted noise (K, dim). Residual MLP blocks, each modulated (adaLN-Zero) by embed(t) + proj(z)."""

    def __init__(self, dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width)
        self.t_emb = MLP(width, width, width)
        self.c_emb = nn.Linear(cond_dim, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width, elementwise_affine=False, eps=1e-6) for _ in range(depth)])
        self.mlps = nn.ModuleList([MLP(width, width, width) for _ in range(depth)])
        self.ada = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width)) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, dim)

    def zero_init(self) -> None:
        for ada in [*self.ada, self.final_ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, z: Tensor | None = None, z_emb: Tensor | None = None) -> Tensor:
        """``z_emb = c_emb(z)`` may be given instead of z (a sampler computes it once for all its steps); t may
        be (1,) for a step shared by every row."""
        c = self.t_emb(timestep_embedding(t, self.width).to(x.dtype)) + (self.c_emb(z) if z_emb is None else z_emb)
        h = self.inp(x)
        for norm, mlp, ada in zip(self.norms, self.mlps, self.ada, strict=True):
            shift, scale, gate = ada(c).chunk(3, dim=-1)
            h = h + gate * mlp(modulate(norm(h), shift, scale))
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))


class LatticeTable(nn.Module):
    """FSQ latents embedded as the code they round to: one table row per (position in a patch, code), a
    patch embedding the sum of its positions' rows, exactly as a MaskGIT trunk embeds a patch of codes.
    Row ``j * prod(levels) + code`` for position j; codes in the tokenizer's order (``fsq_codes_to_index``)."""

    def __init__(self, levels: tuple[int, ...], group: int, d_model: int):
        super().__init__()
        self.levels, self.group = tuple(levels), group
        self.n_codes = math.prod(levels)
        self.table = nn.Embedding(group * self.n_codes, d_model)
        lv = torch.tensor(levels)
        self.register_buffer("zero_digit", torch.div(lv, 2, rounding_mode="floor").float(), persistent=False)
        self.register_buffer("top_digit", (lv - 1).float(), persistent=False)
        self.register_buffer("position_offset", torch.arange(group) * self.n_codes, persistent=False)  # (group,)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., group, C) latents in level units (FSQ: digit = latent + levels // 2) -> (..., D)."""
        digits = (torch.round(x.float()) + self.zero_digit).clamp(min=torch.zeros_like(self.top_digit),
                                                                    max=self.top_digit)
        rows = fsq_codes_to_index(digits, self.levels) + self.position_offset  # (..., group)
        return self.table(rows).sum(-2)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def sample_image_mask(
    shape: tuple[int, ...],
    n_tokens: int,
    min_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MaskGIT training mask: per entry of ``shape`` draw r ~ U(0, 1), mask ratio max(min_ratio, cos(pi/2 r)).

    Returns ``mask`` (*shape, n_tokens) bool (a uniformly random subset of ceil(ratio * n_tokens) tokens,
    at least one) and ``ratio`` (*shape,).
    """
    r = torch.rand(shape, device=device, generator=generator)
    ratio = torch.cos(0.5 * math.pi * r).clamp(min=min_ratio, max=1.0)
    n_masked = (ratio * n_tokens).ceil().clamp(1, n_tokens)  # (*shape)
    noise = torch.rand((*shape, n_tokens), device=device, generator=generator)
    rank = noise.argsort(dim=-1).argsort(dim=-1)  # a random permutation per entry
    return rank < n_masked[..., None], ratio


def _masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    w = weight.to(torch.float32)
    return ((pred.float() - target.float()) ** 2 * w).sum() / w.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- cache


class HMACache:
    """Temporal key/value ring buffer for each layer, over the last ``window`` frames of every batch row.

    ``k[l]``, ``v[l]``: (B, N, H, window, head_dim). ``pos`` (B,): absolute index of each row's next
    frame (frames appended since its last reset), used for RoPE and for the ring slot ``pos % window``.
    Keys are stored already rotated, so slot order does not matter. Create with ``HMA.new_cache``.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], pos: Tensor):
        self.k, self.v, self.pos = k, v, pos

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def window(self) -> int:
        return self.k[0].shape[3]

    @property
    def length(self) -> Tensor:
        """(B,) number of cached frames of each row (at most ``window``)."""
        return self.pos.clamp(max=self.window)

    def valid(self) -> Tensor:
        """(B, window) bool: which ring slots hold a frame of the row's current episode."""
        slots = torch.arange(self.window, device=self.pos.device)
        return slots[None, :] < self.length[:, None]

    def reset(self, mask: Tensor | None = None) -> None:
        """Forget the history of the rows where ``mask`` (B,) bool is True (all rows if None).

        Their keys and values are zeroed too: attention gives a forgotten slot probability 0, but
        0 * NaN is NaN, so a NaN left by an earlier episode would otherwise poison every later one."""
        if mask is None:
            self.pos.zero_()
            for t in self.k + self.v:
                t.zero_()
        else:
            mask = mask.to(self.pos.device, torch.bool)
            self.pos.masked_fill_(mask, 0)
            for t in self.k + self.v:
                t[mask] = 0

    def push(self, kv: list[tuple[Tensor, Tensor]], rows: Tensor | None = None) -> None:
        """Store one new frame per row: kv[l] = (k, v), each (B, N, H, 1, hd).

        ``rows`` (B,) bool: store only these rows' frames (the others keep their history unchanged).
        """
        index = torch.arange(self.batch_size, device=self.pos.device)
        if rows is not None:
            index = index[rows.to(self.pos.device, torch.bool)]
            kv = [(k[index], v[index]) for k, v in kv]
        self.push_rows(kv, index)

    def push_rows(self, kv: list[tuple[Tensor, Tensor]], index: Tensor) -> None:
        """Store one new frame for each of the rows ``index`` (R,) long: kv[l] = (k, v), each (R, N, H, 1, hd)."""
        slot = self.pos[index] % self.window  # (R,)
        for layer, (k, v) in enumerate(kv):
            self.k[layer][index, :, :, slot] = k[..., 0, :].to(self.k[layer].dtype)
            self.v[layer][index, :, :, slot] = v[..., 0, :].to(self.v[layer].dtype)
        self.pos[index] += 1

    def select(self, index: Tensor) -> HMACache:
        """A cache of the rows ``index`` (R,) long only (a copy: pushing to it leaves this one unchanged)."""
        return HMACache([k[index] for k in self.k], [v[index] for v in self.v], self.pos[index])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ----------------------------------------------------------------------------- model


class HMA(nn.Module):
    """Heterogeneous Masked Autoregression world model (discrete image tokens + state + actions).

    Training: ``loss, metrics = model(batch)``. Inference: ``new_cache``, ``append_frame`` (a known
    frame), ``generate_frame`` (MaskGIT-sample the next one), ``predict_frame`` (one masked pass).
    ``forward_clean`` is the uncached clean stream, e.g. to check the cache against.
    New robots: ``add_embodiment``; ``embodiment_ids`` index the sorted ``embodiment_names``.
    """

    def __init__(self, config: HMAConfig):
        super().__init__()
        self.config = replace(config, embodiments=dict(config.embodiments))  # add_embodiment edits our copy
        D, G = config.d_model, config.grid * config.grid
        self.n_image, self.n_slots, self.group = G, config.image_slots, config.patch_size**2
        # an append to some rows runs the trunk on those rows only; False: on every row (one batch shape,
        # which a trunk compiled with dynamic=False needs; see WorldModel.compile_inference)
        self.append_rows_only = True
        if config.soft:  # a trunk token embeds its patch's latents; [MASK] is a learned vector
            if config.latent_levels:
                self.latent_in = LatticeTable(config.latent_levels, self.group, D)
            else:
                self.latent_in = nn.Linear(self.group * config.latent_dim, D)
            self.image_mask_emb = nn.Parameter(torch.zeros(D))
        else:  # one table per position inside a patch group; code head_classes of each table is [MASK]
            # (factorised: the table holds one row per (channel, level), and a code sums its channels' rows)
            self.tok_emb = nn.Embedding(self.group * (config.head_classes + 1), D)
        self.pos_emb = nn.Parameter(torch.zeros(config.tokens_per_frame, D))  # learned, one per slot
        self.action_mask_emb = nn.Parameter(torch.zeros(D))
        self.state_mask_emb = nn.Parameter(torch.zeros(D))
        self.no_action_tokens = nn.Parameter(torch.zeros(config.n_action_tokens, D))
        self.no_action_cond = nn.Parameter(torch.zeros(D))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.image_norm = nn.LayerNorm(D)
        if config.soft:
            self.diff_head = DiffusionMLP(self.group * config.latent_dim, D, config.diff_width, config.diff_depth)
        else:
            self.image_head = nn.Linear(D, self.group * config.head_classes)
        self.embodiments = nn.ModuleDict()
        self._schedulers: dict[str, Any] = {}

        self.apply(_init_weights)
        if config.soft:
            nn.init.normal_(self.image_mask_emb, std=0.02)
            self.diff_head.zero_init()
        for p in (self.pos_emb, self.action_mask_emb, self.state_mask_emb):
            nn.init.normal_(p, std=0.02)
        for p in (self.no_action_tokens, self.no_action_cond):
            nn.init.normal_(p, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for name, spec in self.config.embodiments.items():
            self.embodiments[name] = EmbodimentModules(spec, self.config)

    # ------------------------------------------------------------------ embodiments

    @property
    def embodiment_names(self) -> list[str]:
        """Sorted embodiment names; ``embodiment_ids`` index this list."""
        return sorted(self.config.embodiments)

    def embodiment_id(self, name: str) -> int:
        """Index of ``name`` in ``embodiment_names``, as used in ``embodiment_ids``."""
        return self.embodiment_names.index(name)

    def add_embodiment(self, name: str, spec: EmbodimentSpec) -> None:
        """Add a robot: new stems and heads only, the trunk is untouched. Ids of later-sorting names shift."""
        _check_embodiment_name(name)
        if name in self.config.embodiments:
            raise ValueError(f"embodiment {name!r} already exists")
        ref = self.pos_emb
        self.embodiments[name] = EmbodimentModules(spec, self.config).to(device=ref.device, dtype=ref.dtype)
        self.config.embodiments[name] = spec

    def num_params(self) -> int:
        """Number of parameters, embodiment stems and heads included."""
        return sum(p.numel() for p in self.parameters())

    def _groups(self, embodiment_ids: Tensor) -> list[tuple[str, Tensor]]:
        """(name, row indices) for each embodiment present in the batch."""
        names = self.embodiment_names
        if not names:
            raise ValueError("the model has no embodiments; add one with add_embodiment(name, spec)")
        groups = []
        for k in embodiment_ids.unique().tolist():
            if not 0 <= k < len(names):
                raise ValueError(f"embodiment id {k} out of range for {names}")
            groups.append((names[k], (embodiment_ids == k).nonzero().squeeze(1)))
        return groups

    def _by_embodiment(
        self,
        groups: list[tuple[str, Tensor]],
        batch_size: int,
        fn: Callable[[str, Tensor], tuple[Tensor, ...]],
    ) -> list[Tensor]:
        """Run fn(name, rows) for each embodiment's rows and scatter its outputs back into batch order."""
        if len(groups) == 1 and len(groups[0][1]) == batch_size:  # one robot: rows are 0..B-1 in order
            return list(fn(*groups[0]))
        outs: list[Tensor] = []
        for name, rows in groups:
            ys = fn(name, rows)
            if not outs:
                outs = [y.new_zeros(batch_size, *y.shape[1:]) for y in ys]
            outs = [o.index_copy(0, rows, y.to(o.dtype)) for o, y in zip(outs, ys, strict=True)]
        return outs

    def _dim_mask(self, embodiment_ids: Tensor, kind: str, width: int) -> Tensor:
        """(B, width) bool: the real (unpadded) action or state dims of each row's embodiment."""
        dims = torch.tensor(
            [getattr(self.config.embodiments[n], kind) for n in self.embodiment_names],
            device=embodiment_ids.device,
        )
        return torch.arange(width, device=embodiment_ids.device) < dims[embodiment_ids][:, None]

    def _check_width(self, x: Tensor, name: str, kind: str) -> None:
        dim = getattr(self.config.embodiments[name], kind)
        if x.shape[-1] < dim:
            raise ValueError(f"{kind} of embodiment {name!r} is {dim}, but the input is only {x.shape[-1]} wide")

    def _embed_actions(self, groups: list[tuple[str, Tensor]], actions: Tensor) -> tuple[Tensor, Tensor]:
        """actions (B, F, A) padded -> action tokens (B, F, n, D), conditioning (B, F, D)."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            self._check_width(actions, name, "action_dim")
            stem = self.embodiments[name].action_stem
            a = actions.index_select(0, rows)[..., : self.config.embodiments[name].action_dim]
            return stem(a.to(stem.to_cond.fc.weight.dtype))

        tokens, cond = self._by_embodiment(groups, actions.shape[0], fn)
        return tokens, cond

    def _embed_states(self, groups: list[tuple[str, Tensor]], states: Tensor) -> Tensor:
        """states (B, F, S) padded -> (B, F, D)."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            self._check_width(states, name, "state_dim")
            stem = self.embodiments[name].state_stem
            s = states.index_select(0, rows)[..., : self.config.embodiments[name].state_dim]
            return (stem(s.to(stem.weight.dtype)),)

        return self._by_embodiment(groups, states.shape[0], fn)[0]

    def _predict_actions(self, groups: list[tuple[str, Tensor]], h: Tensor, width: int) -> Tensor:
        """h (B, F, n, D) action-token outputs -> (B, F, width), zero beyond each embodiment's action_dim."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            a = self.embodiments[name].predict_action(h.index_select(0, rows))
            return (F.pad(a, (0, width - a.shape[-1])),)

        return self._by_embodiment(groups, h.shape[0], fn)[0]

    def _predict_states(self, groups: list[tuple[str, Tensor]], h: Tensor, width: int) -> Tensor:
        """h (B, F, D) state-token outputs -> (B, F, width), zero beyond each embodiment's state_dim."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            s = self.embodiments[name].predict_state(h.index_select(0, rows))
            return (F.pad(s, (0, width - s.shape[-1])),)

        return self._by_embodiment(groups, h.shape[0], fn)[0]

    # ------------------------------------------------------------------ trunk

    def _frame_inputs(
        self,
        tokens: Tensor,
        image_mask: Tensor,
        action_tokens: Tensor,
        action_cond: Tensor,
        action_mode: Tensor,
        state_emb: Tensor,
        state_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Assemble the token rows of F frames and their conditioning.

        tokens (B, F, G) long (mar: latents (B, F, G, C)), image_mask (B, F, G) bool,
        action_tokens (B, F, n, D), action_cond (B, F, D),
        action_mode (B, F) in {ACTION_NONE, ACTION_VISIBLE, ACTION_MASKED}, state_emb (B, F, D),
        state_mask (B, F) bool. Returns x (B, F, N, D) and c (B, F, D).
        """
        if self.config.soft:  # tokens (B, F, G, C) latents; a slot is [MASK] if any of its cells is
            slot_mask = self._to_slots(image_mask).any(-1)  # (B, F, S)
            img = self._embed_latents(tokens)  # (B, F, S, D)
            img = torch.where(slot_mask[..., None], self.image_mask_emb.to(img.dtype), img)  # (B, F, S, D)
        elif self.config.factorized:
            img = self._embed_factorized(tokens, image_mask)
        else:
            V = self.config.vocab_size
            codes = self._to_slots(tokens.masked_fill(image_mask, V))  # (B, F, S, p*p), V = [MASK]
            offset = torch.arange(self.group, device=tokens.device) * (V + 1)
            img = self.tok_emb(codes + offset).sum(-2)  # (B, F, S, D)
        visible = (action_mode == ACTION_VISIBLE)[..., None]  # (B, F, 1)
        hidden = torch.where(
            (action_mode == ACTION_MASKED)[..., None, None], self.action_mask_emb, self.no_action_tokens
        )
        act = torch.where(visible[..., None], action_tokens, hidden.to(action_tokens.dtype))  # (B, F, n, D)
        # a masked action must not leak through the modulation either: condition on "no action"
        cond = torch.where(visible, action_cond, self.no_action_cond.to(action_cond.dtype))  # (B, F, D)
        state = torch.where(state_mask[..., None], self.state_mask_emb.to(state_emb.dtype), state_emb)
        x = torch.cat([img, act.to(img.dtype), state[:, :, None].to(img.dtype)], dim=2)  # (B, F, N, D)
        return x + self.pos_emb.to(x.dtype), cond

    def _level_offsets(self, device: torch.device | str) -> Tensor:
        """(C,) first row/logit of each FSQ channel inside one sub-position's block of sum(levels)."""
        levels = torch.tensor(self.config.code_levels, device=device)
        return levels.cumsum(0) - levels

    def _embed_factorized(self, tokens: Tensor, image_mask: Tensor) -> Tensor:
        """Factorised head: codes (B, F, G), mask (B, F, G) -> (B, F, S, D); a code's embedding is the sum of
        its channels' level rows, a [MASK] token's the sub-position's mask row."""
        L = self.config.head_classes
        digits = index_to_codes(tokens.masked_fill(image_mask, 0), self.config.code_levels)  # (B, F, G, C)
        rows = digits + self._level_offsets(tokens.device)
        sub = torch.arange(self.group, device=tokens.device)[:, None] * (L + 1)  # (p*p, 1)
        rows = self._to_slots(rows.movedim(-1, -2)).movedim(-3, -1) + sub  # (B, F, S, p*p, C)
        masked = self._to_slots(image_mask)[..., None]  # (B, F, S, p*p, 1)
        emb = self.tok_emb(rows).sum(-2)  # (B, F, S, p*p, D)
        emb = torch.where(masked, self.tok_emb(sub[:, 0] + L), emb)
        return emb.sum(-2)

    def _factorized_log_probs(self, logits: Tensor) -> Tensor:
        """Factorised head: per-channel logits (..., sum(levels)) -> log-probabilities of every code (..., V),
        the sum of each channel's log-softmax at the code's level."""
        levels = self.config.code_levels
        out = None
        for c, part in enumerate(logits.float().split(list(levels), dim=-1)):  # channel c is digit c
            lp = part.log_softmax(-1)
            lp = lp.view(*lp.shape[:-1], *([1] * (len(levels) - 1 - c)), levels[c], *([1] * c))
            out = lp if out is None else out + lp
        return out.flatten(-len(levels))  # the last channel varies slowest: index = d0 + L0 * (d1 + ...)

    def _factorized_ce(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Factorised head: logits (M, sum(levels)), target codes (M,) -> (cross-entropy of the code, i.e. the
        sum of the channels' cross-entropies; accuracy of the per-channel argmax code)."""
        levels = self.config.code_levels
        digits = index_to_codes(target, levels)  # (M, C)
        parts = logits.split(list(levels), dim=-1)
        ce = sum(F.cross_entropy(p, digits[:, c]) for c, p in enumerate(parts))
        argmax = torch.stack([p.argmax(-1) for p in parts], dim=-1)
        return ce, (argmax == digits).all(-1).float().mean()

    def _factorized_sample(self, logits: Tensor, temperature: float, generator: torch.Generator | None,
                           order: Tensor | None, greedy: bool) -> tuple[Tensor, Tensor]:
        """Factorised head: logits (K, sum(levels)) -> (codes (K,), log-probability of each). Each channel's
        level is drawn from its own softmax (one uniform per token and channel, drawn channel after channel
        in ``order``, see ``sample_categorical``), or its argmax if greedy."""
        digits, logp = [], torch.zeros(len(logits), device=logits.device)
        for part in logits.float().split(list(self.config.code_levels), dim=-1):
            lp = part.log_softmax(-1)
            if greedy:
                d = lp.argmax(-1)
            else:
                probs = torch.softmax(part if temperature == 1.0 else part / temperature, dim=-1)
                d = sample_categorical(probs, generator, order=order)
            digits.append(d)
            logp = logp + lp.gather(1, d[:, None])[:, 0]
        return fsq_codes_to_index(torch.stack(digits, dim=-1), self.config.code_levels), logp

    def _embed_latents(self, latents: Tensor) -> Tensor:
        """mar: latents (..., G, C) in level units -> one embedding per trunk token (..., S, D)."""
        slots = self._latent_slots(latents)  # (..., S, p*p*C)
        if self.config.latent_levels:
            return self.latent_in(slots.unflatten(-1, (self.group, -1))).to(self.image_mask_emb.dtype)
        return self.latent_in((slots * self.config.latent_scale).to(self.image_mask_emb.dtype))

    def _trunk(
        self, x: Tensor, c: Tensor, pos: Tensor, n_clean: int, cache: HMACache | None = None, kv_only: bool = False,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """x (B, F, N, D), c (B, F, D), pos (B, F) -> hidden (B, F, N, D) and each layer's temporal (k, v).
        ``kv_only``: the last layer stops at its keys/values, and the hidden returned is not the output.
        With a cache, F is 1: one frame per row against the cached frames."""
        if cache is not None and x.shape[1] != 1:
            raise ValueError(f"a cached pass takes 1 frame. Got {x.shape[1]}")
        valid = None if cache is None else cache.valid()
        kvs = []
        last = len(self.blocks) - 1
        table = rope_table(pos, self.config.d_model // self.config.n_head)
        for layer, block in enumerate(self.blocks):
            past = None if cache is None else (cache.k[layer], cache.v[layer], valid)
            x, kv = block(x, c, pos, n_clean, past, kv_only=kv_only and layer == last, table=table)
            kvs.append(kv)
        return x, kvs

    def _to_slots(self, x: Tensor) -> Tensor:
        """(..., g*g) row-major image tokens -> (..., S, p*p) grouped by patch."""
        g, p = self.config.grid, self.config.patch_size
        lead = x.shape[:-1]
        x = x.reshape(*lead, g // p, p, g // p, p).transpose(-3, -2)  # (..., g/p, g/p, p, p)
        return x.reshape(*lead, self.n_slots, self.group)

    def _from_slots(self, x: Tensor) -> Tensor:
        """(..., S, p*p, V) per-patch outputs -> (..., g*g, V) in row-major token order."""
        g, p = self.config.grid, self.config.patch_size
        lead, V = x.shape[:-3], x.shape[-1]
        x = x.reshape(*lead, g // p, g // p, p, p, V).transpose(-4, -3)  # (..., g/p, p, g/p, p, V)
        return x.reshape(*lead, g * g, V)

    def _latent_slots(self, x: Tensor) -> Tensor:
        """(..., g*g, C) row-major latent cells -> (..., S, p*p*C) one vector per trunk token."""
        return self._to_slots(x.movedim(-1, -2)).movedim(-3, -1).flatten(-2)  # (..., S, p*p, C) -> flat

    def _latent_cells(self, x: Tensor) -> Tensor:
        """Inverse of ``_latent_slots``: (..., S, p*p*C) -> (..., g*g, C)."""
        return self._from_slots(x.unflatten(-1, (self.group, -1)))

    def _slot_to_token_mask(self, slot_mask: Tensor) -> Tensor:
        """(..., S) bool per trunk token -> (..., g*g) bool per image cell."""
        return self._from_slots(slot_mask[..., None, None].expand(*slot_mask.shape, self.group, 1))[..., 0]

    def _flat_tokens(self, tokens: Tensor, lead: int) -> Tensor:
        """(lead dims, g, g) codes -> (lead, G); mar: (lead, g, g, C) latents -> (lead, G, C)."""
        g, G = self.config.grid, self.n_image
        want = (g, g, self.config.latent_dim) if self.config.soft else (g, g)
        if tuple(tokens.shape[lead:]) != want:
            kind = "latents" if self.config.soft else "tokens"
            raise ValueError(f"{kind} must be (..., {', '.join(map(str, want))}). Got {tuple(tokens.shape)}")
        return tokens.reshape(*tokens.shape[:lead], G, *want[2:])

    def _head_logits(self, h: Tensor) -> Tensor:
        """h (..., S, D) image-slot outputs -> the head's raw logits (..., g*g, head_classes) per image token."""
        logits = self.image_head(self.image_norm(h))  # (..., S, p*p*classes)
        return self._from_slots(logits.unflatten(-1, (self.group, self.config.head_classes)))

    def _image_logits(self, h: Tensor) -> Tensor:
        """h (..., S, D) image-slot outputs -> logits (..., g*g, V) for every image token (factorised head:
        the log-probability of every code, a valid logit)."""
        logits = self._head_logits(h)
        return self._factorized_log_probs(logits) if self.config.factorized else logits

    def forward_clean(
        self,
        tokens: Tensor,
        actions: Tensor,
        states: Tensor,
        embodiment_ids: Tensor,
        action_valid: Tensor | None = None,
    ) -> Tensor:
        """Uncached clean stream (everything visible, causal across frames) -> hidden (B, T, N, D).

        Same inputs as ``forward``; appending these frames one by one to a fresh cache gives the same outputs.
        """
        B, T = tokens.shape[:2]
        tokens = self._flat_tokens(tokens, 2)
        groups = self._groups(embodiment_ids)
        prev_actions, action_valid = self._shift_actions(actions, action_valid)
        act_tok, act_cond = self._embed_actions(groups, prev_actions)
        state_emb = self._embed_states(groups, states)
        mode = torch.where(action_valid, ACTION_VISIBLE, ACTION_NONE)
        no_mask = torch.zeros(tokens.shape[:3], dtype=torch.bool, device=tokens.device)
        x, c = self._frame_inputs(
            tokens,
            no_mask,
            act_tok,
            act_cond,
            mode,
            state_emb,
            torch.zeros_like(mode, dtype=torch.bool),
        )
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        h, _ = self._trunk(x, c, pos, n_clean=T)
        return h

    # ------------------------------------------------------------------ training

    @staticmethod
    def _shift_actions(actions: Tensor, action_valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """actions[:, t] = a_t -> (a_{t-1} of each frame (B, T, A), whether frame t has one (B, T))."""
        B, T = actions.shape[:2]
        prev = F.pad(actions[:, :-1], (0, 0, 1, 0))  # (B, T, A); frame 0's a_{-1} is not in the batch
        if action_valid is None:
            action_valid = torch.ones(B, T, dtype=torch.bool, device=actions.device)
        first = torch.arange(T, device=actions.device) == 0
        return prev, action_valid.to(torch.bool) & ~first

    def _two_stream_hidden(
        self,
        groups: list[tuple[str, Tensor]],
        tokens: Tensor,
        prev_actions: Tensor,
        states: Tensor,
        clean_mode: Tensor,
        masked_mode: Tensor,
        image_mask: Tensor,
        state_mask: Tensor,
        t0: int,
    ) -> Tensor:
        """Clean stream over all T frames + masked stream over frames t0: -> masked hidden (B, T-t0, N, D).

        tokens (B, T, G); clean_mode / masked_mode (B, T) action modes; image_mask (B, T, G) and state_mask
        (B, T) apply to the masked stream only. Masked frames never attend to each other, so the masked
        stream only needs the frames that some sample predicts.
        """
        B, T = tokens.shape[:2]
        act_tok, act_cond = self._embed_actions(groups, prev_actions)  # (B, T, n, D), (B, T, D)
        state_emb = self._embed_states(groups, states)  # (B, T, D)
        nothing = torch.zeros_like(image_mask)
        xc, cc = self._frame_inputs(tokens, nothing, act_tok, act_cond, clean_mode, state_emb, nothing[..., 0])
        xm, cm = self._frame_inputs(
            tokens[:, t0:], image_mask[:, t0:], act_tok[:, t0:], act_cond[:, t0:],
            masked_mode[:, t0:], state_emb[:, t0:], state_mask[:, t0:],
        )  # fmt: skip
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        # spatial attention and MLP are per frame, so both streams share one pass along the frame axis
        x = torch.cat([xc, xm], dim=1)  # (B, T + T - t0, N, D)
        h, _ = self._trunk(x, torch.cat([cc, cm], dim=1), torch.cat([pos, pos[:, t0:]], dim=1), n_clean=T)
        return h[:, T:]

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked-autoregression loss on one batch.

        batch: ``tokens`` (B, T, g, g) long; ``actions`` (B, T, A_max) with actions[:, t] = a_t, the action
        taken at frame t (normalised, zero-padded beyond each embodiment's action_dim); ``states``
        (B, T, S_max) likewise; ``embodiment_ids`` (B,) long into ``embodiment_names``; ``n_prompt`` (B,)
        long in [1, T-1], frames < n_prompt are context only; optional ``action_valid`` (B, T) bool, whether
        frame t has an incoming action a_{t-1} (column 0 is always treated as False).

        Per sample one objective is drawn from ``config.objective_probs``; frames >= n_prompt are predicted:
        - forward: a_{t-1} visible; predict the masked image tokens and the state.
        - full:    as forward, but a_{t-1} is masked too and predicted.
        - passive: no actions anywhere (video only); predict image tokens and state.
        - policy:  image, state and a_{t-1} all masked; predict a_{t-1} (and image/state).
        The clean stream always holds what inference has for past frames: their true image and state,
        and their true actions, except under "passive", where the model never sees actions.

        Returns (loss, metrics); metrics are detached 0-dim tensors: loss, ce, state_mse, action_mse and
        accuracy (of the argmax on masked image tokens).
        """
        cfg = self.config
        tokens = self._flat_tokens(batch["tokens"], 2)  # (B, T, G) codes, mar: (B, T, G, C) latents
        actions, states, ids, n_prompt = (
            batch["actions"],
            batch["states"],
            batch["embodiment_ids"],
            batch["n_prompt"],
        )
        B, T, G = tokens.shape[:3]
        device = tokens.device
        if T > cfg.max_frames:
            raise ValueError(f"batch has {T} frames but max_frames is {cfg.max_frames}")
        n_min, n_max = int(n_prompt.min()), int(n_prompt.max())
        if n_min < 1 or n_max > T - 1:
            raise ValueError(f"n_prompt must be in [1, T-1] = [1, {T - 1}]. Got values in [{n_min}, {n_max}]")

        # 1. an objective per sample, and which frames are predicted
        probs = torch.tensor([cfg.objective_probs.get(o, 0.0) for o in OBJECTIVES], device=device)
        objective = torch.multinomial(probs, B, replacement=True)  # (B,) index into OBJECTIVES
        passive = objective == OBJECTIVES.index("passive")
        policy = objective == OBJECTIVES.index("policy")
        hide_actions = (objective == OBJECTIVES.index("full")) | policy
        predicted = torch.arange(T, device=device)[None, :] >= n_prompt[:, None]  # (B, T)

        # 2. what each stream sees
        prev_actions, has_action = self._shift_actions(actions, batch.get("action_valid"))
        has_action = has_action & ~passive[:, None]  # (B, T)
        clean_mode = torch.where(has_action, ACTION_VISIBLE, ACTION_NONE)
        action_target = has_action & predicted & hide_actions[:, None]  # (B, T) frames whose a_{t-1} is predicted
        masked_mode = torch.where(action_target, ACTION_MASKED, clean_mode)
        if cfg.soft:  # mar masks whole trunk tokens (a patch of latent cells)
            slot_mask, _ = sample_image_mask((B, T), self.n_slots, cfg.min_mask_ratio, device=device)
            image_mask = self._slot_to_token_mask(slot_mask)
        else:
            image_mask, _ = sample_image_mask((B, T), G, cfg.min_mask_ratio, device=device)
        image_mask = (image_mask | policy[:, None, None]) & predicted[..., None]  # (B, T, G)
        state_mask = predicted

        # 3. trunk
        groups = self._groups(ids)
        h = self._two_stream_hidden(
            groups, tokens, prev_actions, states, clean_mode, masked_mode, image_mask, state_mask, n_min
        )  # (B, T', N, D)

        # 4. losses on the masked stream's predicted frames
        sl = slice(n_min, T)
        img_mask = image_mask[:, sl]  # (B, T', G)
        if cfg.soft:
            slot_mask = self._to_slots(img_mask).any(-1)  # (B, T', S)
            z = self.image_norm(h[:, :, : self.n_slots][slot_mask])  # (M, D)
            target = self._latent_slots(tokens[:, sl])[slot_mask] * cfg.latent_scale  # (M, p*p*C)
            image_loss = self._diffusion_loss(z, target.to(z.dtype))
            image_metrics = {"diff_mse": image_loss}
        else:
            if self.group == 1:  # only the masked tokens need logits
                logits = self.image_head(self.image_norm(h[:, :, :G][img_mask])).float()  # (M, V)
            else:
                logits = self._head_logits(h[:, :, : self.n_slots])[img_mask].float()  # (M, V)
            target = tokens[:, sl][img_mask]  # (M,)
            if cfg.factorized:  # logits (M, sum(levels))
                image_loss, accuracy = self._factorized_ce(logits, target)
            else:
                image_loss, accuracy = F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()
            image_metrics = {"ce": image_loss, "accuracy": accuracy}

        S = states.shape[-1]
        pred_states = self._predict_states(groups, h[:, :, -1], S)  # (B, T', S)
        w = predicted[:, sl, None] & self._dim_mask(ids, "state_dim", S)[:, None]
        state_mse = _masked_mse(pred_states, states[:, sl], w)

        A = actions.shape[-1]
        S_img = self.n_slots
        pred_actions = self._predict_actions(groups, h[:, :, S_img : S_img + cfg.n_action_tokens], A)  # (B, T', A)
        w = action_target[:, sl, None] & self._dim_mask(ids, "action_dim", A)[:, None]
        action_mse = _masked_mse(pred_actions, prev_actions[:, sl], w)

        loss = image_loss + cfg.state_loss_weight * state_mse + cfg.action_loss_weight * action_mse
        metrics = {"loss": loss, **image_metrics, "state_mse": state_mse, "action_mse": action_mse}
        return loss, {k: v.detach() for k, v in metrics.items()}

    # ------------------------------------------------------------------ mar: the diffusion head

    def _scheduler(self, kind: str, sample_steps: int | None = None):
        """diffusers' DDPM (training: noising) or DDIM (sampling) scheduler of this model's noise schedule."""
        key = f"{kind}{sample_steps or ''}"
        if key not in self._schedulers:
            from diffusers import DDIMScheduler, DDPMScheduler

            kw = dict(num_train_timesteps=self.config.diff_train_steps, beta_schedule="squaredcos_cap_v2",
                      clip_sample=False, prediction_type="epsilon")
            if kind == "ddpm":
                self._schedulers[key] = DDPMScheduler(**kw)
            else:
                sched = DDIMScheduler(**kw)
                sched.set_timesteps(sample_steps)
                self._schedulers[key] = sched
        return self._schedulers[key]

    def _diffusion_loss(self, z: Tensor, x0: Tensor) -> Tensor:
        """Noise-prediction MSE of the diffusion head on targets x0 (M, dim) given trunk outputs z (M, D),
        with ``diff_batch_mul`` noise draws per target."""
        mul = self.config.diff_batch_mul
        z, x0 = z.repeat(mul, 1), x0.repeat(mul, 1)
        t = torch.randint(0, self.config.diff_train_steps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        sched = self._scheduler("ddpm")
        alphas = sched.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t][:, None]
        xt = (alphas.sqrt() * x0.float() + (1 - alphas).sqrt() * noise.float()).to(x0.dtype)
        return F.mse_loss(self.diff_head(xt, t, z).float(), noise.float())

    @torch.no_grad()
    def _diffusion_sample(self, z: Tensor, steps: int, temperature: float, generator: torch.Generator | None,
                          greedy: bool) -> Tensor:
        """DDIM (eta 0) from noise of std ``temperature`` (zero noise if greedy) -> tokens (K, dim)."""
        sched = self._scheduler("ddim", steps)
        dim = self.diff_head.out.out_features
        if greedy:
            x = z.new_zeros(len(z), dim, dtype=torch.float32)
        else:
            x = torch.randn(len(z), dim, device=z.device, generator=generator) * temperature
        z_emb = self.diff_head.c_emb(z)  # the condition is the same at every step
        for t in sched.timesteps:
            eps = self.diff_head(x.to(z.dtype), t.to(z.device).reshape(1), z_emb=z_emb).float()
            x = sched.step(eps, t, x).prev_sample
        return x

    # ------------------------------------------------------------------ inference

    def new_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> HMACache:
        """An empty cache for ``batch_size`` rows holding the last ``max_frames - 1`` frames of each.

        device / dtype default to the model's parameters.
        """
        cfg = self.config
        ref = self.pos_emb
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        # zeros, not empty: masked-out slots are multiplied by probability 0 and must not hold NaNs
        shape = (batch_size, cfg.tokens_per_frame, cfg.n_head, cfg.max_frames - 1, cfg.d_model // cfg.n_head)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        return HMACache(k, v, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def max_state_dim(self) -> int:
        return max((s.state_dim for s in self.config.embodiments.values()), default=0)

    @property
    def max_action_dim(self) -> int:
        return max((s.action_dim for s in self.config.embodiments.values()), default=0)

    def _cached_pass(
        self,
        cache: HMACache,
        tokens: Tensor,
        image_mask: Tensor | None,
        state: Tensor | None,
        action: Tensor | None,
        embodiment_ids: Tensor,
        action_valid: Tensor | None,
        kv_only: bool = False,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], list[tuple[str, Tensor]]]:
        """One frame per row against the cache (read only).

        tokens (B, G) (mar: latents (B, G, C)), image_mask (B, G) or None (all known), state (B, S) or None
        (masked), action a_{t-1} (B, A) or None. Returns hidden (B, N, D) (not the output if ``kv_only``),
        each layer's (k, v) of this frame and the embodiment groups.
        """
        B = tokens.shape[0]
        if B != cache.batch_size:
            raise ValueError(f"batch size {B} does not match the cache's {cache.batch_size}")
        x, c, groups = self._cached_inputs(tokens, image_mask, state, action, embodiment_ids, action_valid)
        h, kvs = self._trunk(x, c, cache.pos[:, None], n_clean=0, cache=cache, kv_only=kv_only)
        return h[:, 0], kvs, groups

    def _action_or_none(
        self, B: int, action: Tensor | None, action_valid: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """An action (B, A) and its validity (B,) bool: no action = zeros marked invalid; default all valid."""
        if action is None:
            return torch.zeros(B, self.max_action_dim, device=device), torch.zeros(B, dtype=torch.bool, device=device)
        if action_valid is None:
            action_valid = torch.ones(B, dtype=torch.bool, device=device)
        return action, action_valid.to(torch.bool)

    def _cached_inputs(
        self, tokens: Tensor, image_mask: Tensor | None, state: Tensor | None, action: Tensor | None,
        embodiment_ids: Tensor, action_valid: Tensor | None,
    ) -> tuple[Tensor, Tensor, list[tuple[str, Tensor]]]:
        """The trunk inputs of one frame per row: x (B, 1, N, D), c (B, 1, D), and the embodiment groups.
        ``image_mask`` None: every token known."""
        B = tokens.shape[0]
        groups = self._groups(embodiment_ids)
        device = tokens.device
        if image_mask is None:
            image_mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=device)
        action, action_valid = self._action_or_none(B, action, action_valid, device)
        state_mask = torch.full((B, 1), state is None, dtype=torch.bool, device=device)
        if state is None:
            state = torch.zeros(B, self.max_state_dim, device=device)
        act_tok, act_cond = self._embed_actions(groups, action[:, None])  # (B, 1, n, D), (B, 1, D)
        state_emb = self._embed_states(groups, state[:, None])  # (B, 1, D)
        mode = torch.where(action_valid, ACTION_VISIBLE, ACTION_NONE)[:, None]  # (B, 1)
        x, c = self._frame_inputs(tokens[:, None], image_mask[:, None], act_tok, act_cond, mode, state_emb, state_mask)
        return x, c, groups

    @torch.no_grad()
    def append_frame(
        self,
        cache: HMACache,
        tokens: Tensor,
        state: Tensor,
        action: Tensor | None,
        embodiment_ids: Tensor,
        action_valid: Tensor | None = None,
        rows: Tensor | None = None,
        return_hidden: bool = True,
    ) -> Tensor | None:
        """Run the clean stream on one known frame per row and store its keys/values (dropping the oldest).

        tokens (B, g, g) long (mar: latents (B, g, g, C)); state (B, S) normalised, S >= each row's
        state_dim; action (B, A) = a_{t-1}, the action that led into this frame, or None at the start of an
        episode; action_valid (B,) bool marks rows whose action is real (e.g. False for rows that just
        reset); rows (B,) bool: append only to these rows (e.g. the envs of a vector env that just reset).
        Returns hidden (B, N, D), or None with ``return_hidden=False``, which skips the work after the last
        layer's keys/values; then ``rows`` that leave some rows out run the trunk on the chosen rows only.
        """
        tokens = self._flat_tokens(tokens, 1)
        if self.append_rows_only and rows is not None and not return_hidden and not bool(rows.all()):
            index = rows.to(cache.pos.device, torch.bool).nonzero(as_tuple=True)[0]
            if len(index) == 0:
                return None
            action, action_valid = (None if t is None else t[index] for t in (action, action_valid))
            _, kvs, _ = self._cached_pass(cache.select(index), tokens[index], None, state[index], action,
                                          embodiment_ids[index], action_valid, kv_only=True)
            cache.push_rows(kvs, index)
            return None
        h, kvs, _ = self._cached_pass(cache, tokens, None, state, action, embodiment_ids, action_valid,
                                      kv_only=not return_hidden)
        cache.push(kvs, rows)
        return h if return_hidden else None

    @torch.no_grad()
    def predict_frame(
        self,
        cache: HMACache,
        tokens: Tensor,
        image_mask: Tensor,
        action: Tensor | None,
        embodiment_ids: Tensor,
        action_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One masked-stream pass for the next frame; does not modify the cache.

        tokens (B, g, g) long (ignored where masked), image_mask (B, g, g) bool (True = [MASK]), state masked.
        Returns image logits (B, g*g, vocab_size) and state (B, max_state_dim) (zero beyond each state_dim).
        """
        if self.config.soft:
            raise ValueError("predict_frame gives logits of discrete tokens; a mar model has none (generate_frame)")
        h, _, groups = self._cached_pass(
            cache, self._flat_tokens(tokens, 1), image_mask.flatten(1), None, action, embodiment_ids, action_valid
        )
        logits = self._image_logits(h[:, : self.n_slots])  # (B, G, V)
        state = self._predict_states(groups, h[:, None, -1], self.max_state_dim)[:, 0]  # (B, S)
        return logits, state

    @torch.no_grad()  # a sampler's: the matmuls write into one output (out=), which autograd refuses
    def _token_logits(
        self, h: Tensor, rows: Tensor, cols: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Logits of chosen image tokens only: h (B, N, D) hidden of a pass; rows, cols (K,) batch row and
        row-major token index of each. -> (logits (K, V) (factorised head: (K, sum(levels)), the raw
        per-channel logits), rows, cols, order): the tokens may come back
        reordered (rows, cols in the order of the logits; token i is the order[i]-th asked for; order None:
        the given order). The same values as ``_image_logits(h)[rows, cols]``, without the head's matmul
        for the tokens not asked for (a frame's sampler needs a fraction)."""
        if not hasattr(self, "_slot_of"):
            where = self._to_slots(torch.arange(self.n_image))  # (S, p*p): token index at (slot, sub-position)
            slot_of, sub_of = torch.empty(self.n_image, dtype=torch.long), torch.empty(self.n_image, dtype=torch.long)
            slot_of[where.flatten()] = torch.arange(self.n_slots).repeat_interleave(self.group)
            sub_of[where.flatten()] = torch.arange(self.group).repeat(self.n_slots)
            self._slot_of, self._sub_of = slot_of, sub_of
        V = self.config.head_classes
        slot, sub = self._slot_of.to(cols.device)[cols], self._sub_of.to(cols.device)[cols]
        weight = self.image_head.weight.view(self.group, V, -1)
        bias = self.image_head.bias.view(self.group, V)
        if self.group == 1:
            return F.linear(self.image_norm(h[rows, slot]), weight[0], bias[0]), rows, cols, None
        # tokens sorted by sub-position: one matmul per sub-position, each writing its own block of the
        # output (no concatenation, no scatter back: the caller takes the order)
        order = torch.argsort(sub, stable=True)
        rows, cols, slot = rows[order], cols[order], slot[order]
        x = self.image_norm(h[rows, slot])  # (K, D)
        out = x.new_empty(len(cols), V)
        start = 0
        for j, count in enumerate(torch.bincount(sub, minlength=self.group).tolist()):
            if count:
                torch.addmm(bias[j], x[start: start + count], weight[j].t(), out=out[start: start + count])
            start += count
        return out, rows, cols, order

    @torch.no_grad()
    def generate_frame(
        self,
        cache: HMACache,
        action: Tensor | None,
        embodiment_ids: Tensor,
        steps: int = 2,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        action_valid: Tensor | None = None,
        diffusion_steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """MaskGIT-sample the next frame of every row given its cached history and action a_{t-1} (B, A).

        (A "mar" model samples latents instead: see ``_generate_soft``; ``diffusion_steps`` is its DDIM
        step count, default ``config.diff_sample_steps``.)

        Starts from all-[MASK]; each of ``steps`` iterations predicts every masked token and reveals as
        many as the cosine schedule says (the last iteration reveals the rest). Sampling: tokens are
        drawn from softmax(logits / temperature) and revealed in a random per-row order, both drawn from
        ``generator`` (on the cache's device), so equal inputs and generator state give equal outputs.
        ``greedy=True``: argmax tokens, revealed most-confident first; no randomness at all.
        Does not modify the cache. Returns tokens (B, g, g) long and the state (B, max_state_dim) predicted
        at the final iteration (zero beyond each row's state_dim).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1. Got {steps=}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or use greedy=True). Got {temperature=}")
        if self.config.soft:
            return self._generate_soft(cache, action, embodiment_ids, steps, temperature, generator, greedy,
                                       action_valid, diffusion_steps)
        B, G, g, device = cache.batch_size, self.n_image, self.config.grid, cache.pos.device
        tokens = torch.zeros(B, G, dtype=torch.long, device=device)
        known = torch.zeros(B, G, dtype=torch.bool, device=device)
        if not greedy:
            order = torch.rand(B, G, device=device, generator=generator).argsort(-1).argsort(-1)  # (B, G)
        n_masked = G
        for i in range(steps):
            h, _, groups = self._cached_pass(
                cache, tokens, ~known, None, action, embodiment_ids, action_valid
            )  # the masked-stream pass of predict_frame, without the logits of every token
            # cosine schedule: tokens still masked after this iteration; at least one revealed per iteration
            still = math.floor(G * math.cos(0.5 * math.pi * (i + 1) / steps))
            n_masked_before = n_masked
            n_masked = 0 if i == steps - 1 else max(0, min(still, n_masked - 1))
            n_reveal = n_masked_before - n_masked  # every row has the same number known
            if greedy:  # confidence ranks every masked token: all of them need logits
                rows, cols = (~known).nonzero(as_tuple=True)
                logits, rows, cols, _ = self._token_logits(h, rows, cols)
                confidence = torch.full((B, G), float("-inf"), device=device)
                sampled = torch.zeros(B, G, dtype=torch.long, device=device)
                if self.config.factorized:  # argmax of each channel: the most likely code
                    sampled[rows, cols], confidence[rows, cols] = self._factorized_sample(logits, 1.0, None,
                                                                                          None, True)
                else:
                    confidence[rows, cols], sampled[rows, cols] = logits.float().log_softmax(-1).max(-1)
                top = confidence.topk(n_reveal, dim=-1).indices
                reveal = torch.zeros_like(known).scatter_(1, top, True)
            else:  # only the tokens this iteration reveals are sampled
                reveal = (order < G - n_masked) & ~known
                rows, cols = reveal.nonzero(as_tuple=True)
                logits, rows, cols, perm = self._token_logits(h, rows, cols)  # (B * n_reveal, V)
                sampled = torch.zeros(B, G, dtype=torch.long, device=device)
                # each token gets the uniform it would get in the order asked for (the draws do not
                # depend on how the head grouped the tokens)
                if self.config.factorized:
                    sampled[rows, cols] = self._factorized_sample(logits, temperature, generator, perm, False)[0]
                else:
                    logits = logits.float()
                    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
                    sampled[rows, cols] = sample_categorical(probs, generator, order=perm)
            tokens = torch.where(reveal, sampled, tokens)
            known = known | reveal
        state = self._predict_states(groups, h[:, None, -1], self.max_state_dim)[:, 0]  # (B, S)
        return tokens.view(B, g, g), state

    def _generate_soft(
        self, cache: HMACache, action: Tensor | None, embodiment_ids: Tensor, steps: int, temperature: float,
        generator: torch.Generator | None, greedy: bool, action_valid: Tensor | None, diffusion_steps: int | None,
    ) -> tuple[Tensor, Tensor]:
        """MAR sampling of the next frame's latents (B, g, g, C): ``steps`` iterations over a random order
        of the trunk tokens (the cosine schedule); each iteration runs the trunk on what is known and the
        diffusion head (DDIM) on the tokens it reveals. Greedy: zero initial noise and a fixed order."""
        cfg = self.config
        B, S, device = cache.batch_size, self.n_slots, cache.pos.device
        n_diff = diffusion_steps or cfg.diff_sample_steps
        dim = self.group * cfg.latent_dim
        slots = torch.zeros(B, S, dim, device=device)  # scaled latents per trunk token
        known = torch.zeros(B, S, dtype=torch.bool, device=device)
        if greedy:
            order = torch.arange(S, device=device).expand(B, S)
        else:
            order = torch.rand(B, S, device=device, generator=generator).argsort(-1).argsort(-1)
        n_masked = S
        for i in range(steps):
            latents = self._latent_cells(slots) / cfg.latent_scale  # (B, G, C)
            h, _, groups = self._cached_pass(cache, latents, self._slot_to_token_mask(~known), None, action,
                                             embodiment_ids, action_valid)
            still = math.floor(S * math.cos(0.5 * math.pi * (i + 1) / steps))
            n_masked = 0 if i == steps - 1 else max(0, min(still, n_masked - 1))
            reveal = (order < S - n_masked) & ~known
            rows, cols = reveal.nonzero(as_tuple=True)
            z = self.image_norm(h[rows, cols])  # (K, D)
            slots[rows, cols] = self._diffusion_sample(z, n_diff, temperature, generator, greedy).to(slots.dtype)
            known = known | reveal
        state = self._predict_states(groups, h[:, None, -1], self.max_state_dim)[:, 0]  # (B, S)
        g = cfg.grid
        return (self._latent_cells(slots) / cfg.latent_scale).view(B, g, g, cfg.latent_dim), state


# ----------------------------------------------------------------------------- presets


def hma_tiny() -> dict[str, Any]:
    """For tests."""
    return {"d_model": 32, "n_layer": 2, "n_head": 2}


def hma_small() -> dict[str, Any]:
    """The CPU default (~6M parameters)."""
    return {"d_model": 192, "n_layer": 6, "n_head": 6}


def hma_base() -> dict[str, Any]:
    """The paper's ablation model."""
    return {"d_model": 256, "n_layer": 32, "n_head": 8}


def hma_xl() -> dict[str, Any]:
    return {"d_model": 768, "n_layer": 32, "n_head": 12}


HMA_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": hma_tiny,
    "small": hma_small,
    "base": hma_base,
    "xl": hma_xl,
}


def make_hma(preset: str = "small", **overrides: Any) -> HMA:
    """Build an HMA from a size preset; any ``HMAConfig`` field can be overridden."""
    if preset not in HMA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(HMA_PRESETS)}")
    return HMA(HMAConfig(**{**HMA_PRESETS[preset](), **overrides}))
