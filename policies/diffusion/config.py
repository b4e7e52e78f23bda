"""`DiffusionPolicyConfig`: everything that fixes a Diffusion Policy's shapes and sampler (no torch import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

SAMPLERS = ("ddim", "ddpm")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "sample")


@dataclass
class DiffusionPolicyArch:
    """The choices that define a Diffusion Policy's architecture and sampler (what a user picks; the
    sizes that come from the data are in `DiffusionPolicyConfig`)."""

    image_key: str = "agentview_image"
    """Camera observation key (uint8 (H, W, 3))."""
    proprio_keys: tuple[str, ...] = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
    """Low-dimensional observation keys, concatenated in this order into the proprio vector."""
    crop_size: int = 58
    """Random crop (training) / centre crop (acting) of the image, in pixels (= image_size: no crop)."""
    n_obs_steps: int = 2
    """Observation frames of history the policy conditions on."""
    horizon: int = 16
    """Actions predicted per chunk (a multiple of 2 ** (len(down_dims) - 1))."""
    n_action_steps: int = 8
    """Actions of a chunk executed before re-planning (<= horizon - n_obs_steps + 1)."""
    encoder_channels: tuple[int, ...] = (16, 32, 64)
    """Image encoder: stride-2 conv stem width, then one stride-2 residual stage per further entry."""
    num_keypoints: int = 32
    """Spatial-softmax keypoints of the image encoder (0 = global average pooling instead)."""
    image_feature_dim: int = 64
    """Image feature size per frame."""
    down_dims: tuple[int, ...] = (64, 128, 256)
    """Channel widths of the 1-D U-Net levels."""
    kernel_size: int = 5
    """Temporal kernel size of the U-Net convolutions."""
    n_groups: int = 8
    """GroupNorm groups (image encoder and U-Net)."""
    diffusion_step_embed_dim: int = 64
    """Size of the diffusion step embedding."""
    num_train_timesteps: int = 100
    """Diffusion steps of the DDPM training schedule."""
    beta_schedule: str = "squaredcos_cap_v2"
    """Noise schedule (diffusers name)."""
    prediction_type: str = "epsilon"
    """What the denoiser predicts: epsilon (the noise) or sample (the clean actions)."""
    sampler: str = "ddim"
    """Scheduler used to act: ddim (fast, deterministic given the initial noise) or ddpm."""
    num_inference_steps: int = 10
    """Denoising steps per sampled chunk."""


@dataclass
class DiffusionPolicyConfig(DiffusionPolicyArch):
    """A CNN Diffusion Policy (Chi et al. 2023) sized for a CPU.

    Time alignment (diffusion_policy's): a sample sees observations t-n_obs_steps+1 .. t and predicts
    actions t-n_obs_steps+1 .. t-n_obs_steps+horizon; the policy executes actions t .. t+n_action_steps-1
    (index n_obs_steps-1 of the chunk onwards), then re-plans.
    """

    proprio_dim: int = 9
    """Length of the concatenated proprio vector."""
    action_dim: int = 7
    """Action size."""
    image_size: int = 64
    """Height and width of the camera image."""

    def __post_init__(self):
        self.proprio_keys = tuple(str(k) for k in self.proprio_keys)
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.down_dims = tuple(int(d) for d in self.down_dims)
        for name in ("action_dim", "image_size", "crop_size", "n_obs_steps", "horizon", "n_action_steps",
                     "image_feature_dim", "kernel_size", "n_groups", "diffusion_step_embed_dim",
                     "num_train_timesteps", "num_inference_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive. Got {name}={getattr(self, name)}")
        if self.proprio_dim < 0 or self.num_keypoints < 0:
            raise ValueError(f"proprio_dim and num_keypoints must be >= 0. Got {self.proprio_dim=}, "
                             f"{self.num_keypoints=}")
        if self.crop_size > self.image_size:
            raise ValueError(f"crop_size must be <= image_size. Got {self.crop_size=}, {self.image_size=}")
        if self.n_action_steps > self.horizon - self.n_obs_steps + 1:
            raise ValueError(f"n_action_steps must be <= horizon - n_obs_steps + 1 (the chunk holds the history's "
                             f"actions first). Got {self.n_action_steps=}, {self.horizon=}, {self.n_obs_steps=}")
        if not self.down_dims or not self.encoder_channels:
            raise ValueError(f"down_dims and encoder_channels need at least one entry. Got {self.down_dims=}, "
                             f"{self.encoder_channels=}")
        if self.horizon % 2 ** (len(self.down_dims) - 1):
            raise ValueError(f"horizon must be a multiple of 2 ** (len(down_dims) - 1) = "
                             f"{2 ** (len(self.down_dims) - 1)} (the U-Net halves it per level). Got {self.horizon=}")
        for name in ("down_dims", "encoder_channels"):
            bad = [c for c in getattr(self, name) if c <= 0 or c % self.n_groups]
            if bad:
                raise ValueError(f"{name} must be positive multiples of n_groups={self.n_groups}. "
                                 f"Got {name}={getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd. Got {self.kernel_size=}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be <= num_train_timesteps. Got "
                             f"{self.num_inference_steps=}, {self.num_train_timesteps=}")
        for name, choices in (("sampler", SAMPLERS), ("beta_schedule", BETA_SCHEDULES),
                              ("prediction_type", PREDICTION_TYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}. Got {name}={getattr(self, name)!r}")

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return (self.image_key, *self.proprio_keys)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionPolicyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionPolicyConfig fields {unknown}")
        return cls(**d)
