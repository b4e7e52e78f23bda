"""Success detector: one camera frame + the proprio vector -> the probability that the task is solved.

The learned env has no simulator to ask whether the cube is lifted, so a small classifier trained on
ground-truth success labels gives it reward and termination (no human labels generated videos):

    images (B, H, W, 3) uint8 --CNN--> (B, hidden) --+
                                                     +--> concat --MLP--> logit (B,)
    states (B, S) normalised --MLP--> (B, state_hidden)

The CNN keeps the spatial layout (its last feature map is flattened, not pooled) because "where is the
cube, how high" is the question. States are normalised by the caller with the training data's mean/std
(`load_detector` returns them beside the model). It is called every env step, so it is kept small
(~0.2M parameters, well under 2 ms a frame on one CPU core). Robustness to generated frames comes from
the augmentation in `training/train_detector.py`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hma_gym.checkpoint import CheckpointError, load_module_weights, load_tensors, read_module_config
from hma_gym.models.tokenizer import images_to_float

__all__ = ["DetectorConfig", "SuccessDetector", "load_detector", "DETECTOR_NAME", "NORM_FILE"]

DETECTOR_NAME = "detector"
"""`detector.safetensors` + `detector.json` in a run or checkpoint directory."""
NORM_FILE = "detector_normalization.safetensors"
"""State mean/std the detector's inputs were normalised with (`state_mean`, `state_std`)."""

Images = torch.Tensor | np.ndarray
"""uint8 (B, H, W, 3) frames, numpy or torch, or float (B, 3, H, W) in [0, 1]."""


@dataclass
class DetectorConfig:
    image_size: int = 64
    """Side of the square input frame in pixels."""
    state_dim: int = 9
    """Length of the proprio vector (eef pos 3 + eef quat 4 + gripper qpos 2 for Lift); 0 = image only."""
    patch: int = 4
    """The first stage is a patch x patch conv with stride patch (a cheap stem: at batch 1 on CPU a
    full-resolution 3x3 conv costs as much as the rest of the network)."""
    channels: tuple[int, ...] = (32, 64, 64)
    """Width of the stem, then of each 3x3 stride-2 stage; the last map (feature_grid^2 cells) is flattened."""
    hidden: int = 128
    """Width of the image feature and of the fused MLP."""
    state_hidden: int = 64
    """Width of the state MLP."""
    dropout: float = 0.1
    """Dropout before the fused MLP and before the logit."""

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # JSON gives lists
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive. Got {self.image_size=}")
        if len(self.channels) < 1 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty tuple of positive widths. Got {self.channels=}")
        if self.patch < 1:
            raise ValueError(f"patch must be positive. Got {self.patch=}")
        if self.image_size % self.downsample != 0:
            raise ValueError(
                f"image_size must be divisible by patch * 2**(len(channels) - 1) (stem, then one stride-2 "
                f"stage a width). Got {self.image_size=}, {self.patch=}, {self.channels=}"
            )
        if self.state_dim < 0:
            raise ValueError(f"state_dim must be >= 0. Got {self.state_dim=}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be positive. Got {self.hidden=}")
        if self.state_hidden < 1:
            raise ValueError(f"state_hidden must be positive. Got {self.state_hidden=}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1). Got {self.dropout=}")

    @property
    def downsample(self) -> int:
        """Image side / feature map side."""
        return self.patch * 2 ** (len(self.channels) - 1)

    @property
    def feature_grid(self) -> int:
        """Side of the last conv feature map."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown DetectorConfig field(s): {unknown}")
        return cls(**d)


class ConvStage(nn.Module):
    """conv (3x3/2, or k x k/k for the stem) -> GroupNorm -> SiLU; one conv a stage (batch-1 latency is per layer)."""

    def __init__(self, c_in: int, c_out: int, patch: int = 0):
        super().__init__()
        groups = next(g for g in (8, 4, 2, 1) if c_out % g == 0)
        conv = nn.Conv2d(c_in, c_out, patch, stride=patch) if patch else nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.net = nn.Sequential(
            conv,
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SuccessDetector(nn.Module):
    """Frame + normalised proprio -> success logit. See the module docstring for the layout."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        stages = [ConvStage(3, cfg.channels[0], patch=cfg.patch)]
        stages += [ConvStage(a, b) for a, b in zip(cfg.channels, cfg.channels[1:], strict=False)]
        self.cnn = nn.Sequential(*stages)  # (B, 3, H, W) -> (B, channels[-1], feature_grid, feature_grid)
        g = cfg.feature_grid
        self.image_proj = nn.Sequential(nn.Flatten(), nn.Linear(cfg.channels[-1] * g * g, cfg.hidden), nn.SiLU())
        fused = cfg.hidden
        if cfg.state_dim > 0:
            self.state_mlp = nn.Sequential(
                nn.Linear(cfg.state_dim, cfg.state_hidden), nn.SiLU(),
                nn.Linear(cfg.state_hidden, cfg.state_hidden), nn.SiLU(),
            )
            fused += cfg.state_hidden
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(fused, cfg.hidden), nn.SiLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, 1),
        )

    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def _to_float(self, images: Images) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in the model's dtype/device."""
        return images_to_float(images, self.cfg.image_size, self.head[-1].weight)

    def forward(self, images: Images, states: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Success logits (B,). `states` (B, state_dim) are already normalised (ignored when state_dim=0)."""
        x = self._to_float(images) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        feat = self.image_proj(self.cnn(x))  # (B, hidden)
        if self.cfg.state_dim > 0:
            if states is None:
                raise ValueError(f"this detector needs states (B, {self.cfg.state_dim})")
            states = torch.as_tensor(states).to(device=feat.device, dtype=feat.dtype)
            if states.ndim != 2 or states.shape != (feat.shape[0], self.cfg.state_dim):
                raise ValueError(
                    f"states must be (B, {self.cfg.state_dim}) with B={feat.shape[0]}. Got {tuple(states.shape)}"
                )
            feat = torch.cat([feat, self.state_mlp(states)], dim=-1)  # (B, hidden + state_hidden)
        return self.head(feat).squeeze(-1)  # (B,)

    @torch.no_grad()
    def predict_proba(self, images: Images, states: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Success probabilities (B,) in eval mode (the module's train/eval mode is restored afterwards)."""
        if not self.training:
            return torch.sigmoid(self(images, states).float())
        self.eval()
        try:
            return torch.sigmoid(self(images, states).float())
        finally:
            self.train()


def load_detector(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SuccessDetector, float, dict[str, torch.Tensor]]:
    """`(detector in eval mode, decision threshold, {"state_mean", "state_std"})` from `directory`.

    The caller normalises raw states as `(states - state_mean) / state_std` before calling the detector.

    Reads `detector.json`, `detector.safetensors` and `detector_normalization.safetensors`; a missing or
    mismatched file is a `CheckpointError` naming it.
    """
    directory = Path(directory)
    meta = read_module_config(directory, DETECTOR_NAME)
    json_path = directory / f"{DETECTOR_NAME}.json"
    try:
        cfg = DetectorConfig.from_dict(meta["detector"])
        threshold = float(meta.get("threshold", 0.5))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{json_path} does not hold a valid detector config ({e!r})") from e
    model = SuccessDetector(cfg)
    load_module_weights(model, directory / f"{DETECTOR_NAME}.safetensors")
    norm_path = directory / NORM_FILE
    stats = load_tensors(norm_path)
    if "state_mean" not in stats or "state_std" not in stats:
        raise CheckpointError(f"{norm_path} has no state_mean/state_std")
    norm = {k: stats[k].float().to(device) for k in ("state_mean", "state_std")}
    if cfg.state_dim and tuple(norm["state_mean"].shape) != (cfg.state_dim,):
        raise CheckpointError(
            f"{norm_path}: state_mean has shape {tuple(norm['state_mean'].shape)}, the detector takes {cfg.state_dim}"
        )
    return model.to(device).eval(), threshold, norm
