"""Diffusion Policy (Chi et al. 2023, CNN variant) behind the batched policy protocol.

`import policies.diffusion` is light (the config only); `DiffusionPolicy` and `load_diffusion_policy`
import torch models and diffusers when first asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policies.diffusion.config import DiffusionPolicyConfig

if TYPE_CHECKING:
    from policies.diffusion.policy import DiffusionPolicy

__all__ = ["SHIPPED_POLICIES", "DiffusionPolicy", "DiffusionPolicyConfig", "load_diffusion_policy"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_POLICIES: dict[str, Path] = {"dp-lift": ASSETS / "dp_lift"}
"""Names of the policies shipped with the package -> their checkpoint directories."""


def load_diffusion_policy(path_or_name: str | os.PathLike, device: str = "cpu", seed: int = 0) -> DiffusionPolicy:
    """A Diffusion Policy from a checkpoint directory or a shipped name (e.g. "dp-lift")."""
    from hma_gym.checkpoint import CheckpointError
    from policies.diffusion.policy import DiffusionPolicy

    name = os.fspath(path_or_name)
    if name in SHIPPED_POLICIES:
        directory = SHIPPED_POLICIES[name]
        if not directory.is_dir():
            raise CheckpointError(f"shipped policy {name} not found at {directory} (train one with "
                                  f"`hma-gym train-policy` and copy its output directory there)")
        return DiffusionPolicy.load(directory, device=device, seed=seed)
    return DiffusionPolicy.load(name, device=device, seed=seed)


def __getattr__(name: str) -> Any:
    if name == "DiffusionPolicy":
        from policies.diffusion.policy import DiffusionPolicy

        return DiffusionPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
