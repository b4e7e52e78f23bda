"""stable-baselines3 models behind the batched policy protocol."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SB3Policy:
    """Wrap a stable-baselines3 model (`model.predict`) as a batched policy.

    SB3 models take the env's observation dict with a leading env dimension already, so the wrapper
    only fixes dtypes and clips to the action bounds. `deterministic=True` by default (evaluation).
    """

    def __init__(self, model, deterministic: bool = True):
        self.model, self.deterministic = model, deterministic

    @classmethod
    def load(cls, spec: str, deterministic: bool = True) -> SB3Policy:
        """`ALGO:PATH`, e.g. `PPO:runs/ppo_lift.zip` (a zip saved by SB3's `model.save`)."""
        import stable_baselines3

        algo, _, path = spec.partition(":")
        if not path or not hasattr(stable_baselines3, algo.upper()):
            raise ValueError(f"SB3 policies are given as ALGO:PATH (e.g. PPO:model.zip). Got {spec!r}")
        return cls(getattr(stable_baselines3, algo.upper()).load(path, device="cpu"), deterministic)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        actions, _ = self.model.predict(obs, deterministic=self.deterministic)
        actions = np.asarray(actions, dtype=np.float32)
        space = self.model.action_space
        return np.clip(actions, space.low, space.high)

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        pass
