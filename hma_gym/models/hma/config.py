"""HMA's configuration: one validated dataclass per model, and the size presets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hma_gym.checkpoint import CheckpointError

OBJECTIVES = ("forward", "full", "passive", "policy")
"""Masking objectives, see ``HMA.forward``."""

IMAGE_HEADS = ("maskgit", "mar")
"""Image heads of ``HMAConfig.head``."""


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbodimentSpec:
        """A spec from its JSON dict. ``state_bins`` (binned state values, removed: superseded by the state
        model, no shipped model used it) is read where empty, refused otherwise."""
        d = dict(d)
        bins = d.pop("state_bins", ())
        if bins:
            raise CheckpointError(f"state_bins={bins}: binned state values were removed (superseded by the state "
                                  "model, hma-gym train-state; no shipped model used them). This model cannot be "
                                  "loaded")
        return cls(**d)


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
    latents, a per-token diffusion MLP conditioned on the trunk output, as in MAR)."""
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
            name: spec if isinstance(spec, EmbodimentSpec) else EmbodimentSpec.from_dict(spec)
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
            check_embodiment_name(name)
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
    def continuous(self) -> bool:
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


def check_embodiment_name(name: str) -> None:
    # names become nn.ModuleDict keys (state-dict prefixes)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"embodiment names must be non-empty strings without '.'. Got {name=}")


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
