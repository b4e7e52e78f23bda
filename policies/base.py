"""The one policy protocol every part of the project drives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Policy(Protocol):
    """A batched policy.

    `act(obs)` takes a dict of arrays with a leading env dimension (n_envs, ...) and returns actions
    of shape (n_envs, action_dim). `reset(env_ids=None)` clears internal state (queued action
    chunks, scripted phases) of the given envs, or of all envs when `env_ids` is None. A single env
    is a batch of one; `hma_gym.rollout` adds and removes that dimension.
    """

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray: ...

    def reset(self, env_ids: Sequence[int] | None = None) -> None: ...


def batch_size_of(obs: dict[str, np.ndarray]) -> int:
    """Leading dimension shared by every array of a batched observation."""
    sizes = {np.shape(v)[0] for v in obs.values()}
    if len(sizes) != 1:
        raise ValueError(f"observation arrays disagree on the batch dimension: {sorted(sizes)}")
    return sizes.pop()


class RandomPolicy:
    """Uniform random actions in [-scale, scale]; seeded, batched."""

    def __init__(self, action_dim: int = 7, scale: float = 1.0, seed: int | None = None):
        self.action_dim, self.scale = action_dim, scale
        self.rng = np.random.default_rng(seed)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        n = batch_size_of(obs)
        return self.rng.uniform(-self.scale, self.scale, (n, self.action_dim)).astype(np.float32)

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        pass


class SmoothRandomPolicy:
    """Temporally correlated random actions: per env an AR(1) process a_t = rho a_(t-1) + sqrt(1 - rho^2) e_t,
    e_t ~ N(0, scale^2), clipped to [-1, 1]. rho = 0 is white noise; rho = 0.9 drifts over ~10 steps (0.5 s at
    20 Hz), the way a poorly trained policy wanders rather than jitters."""

    def __init__(self, action_dim: int = 7, rho: float = 0.9, scale: float = 0.6, seed: int | None = None):
        if not 0 <= rho < 1:
            raise ValueError(f"rho must be in [0, 1). Got {rho=}")
        if scale < 0:
            raise ValueError(f"scale must be >= 0. Got {scale=}")
        self.action_dim, self.rho, self.scale = action_dim, rho, scale
        self.rng = np.random.default_rng(seed)
        self.state: np.ndarray | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        n = batch_size_of(obs)
        if self.state is None or len(self.state) != n:
            self.state = self.rng.normal(0.0, self.scale, (n, self.action_dim))
        noise = self.rng.normal(0.0, self.scale, (n, self.action_dim))
        self.state = self.rho * self.state + np.sqrt(1 - self.rho**2) * noise
        return np.clip(self.state, -1.0, 1.0).astype(np.float32)

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        if self.state is None or env_ids is None:
            self.state = None
            return
        for i in env_ids:
            self.state[i] = self.rng.normal(0.0, self.scale, self.action_dim)


class ConstantPolicy:
    """The same action in every env at every step (zeros by default: the arm holds still)."""

    def __init__(self, action: Sequence[float] | np.ndarray | None = None, action_dim: int = 7):
        self.action = np.zeros(action_dim, np.float32) if action is None else np.asarray(action, np.float32)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.tile(self.action, (batch_size_of(obs), 1))

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        pass


class ReplayPolicy:
    """Plays fixed action sequences, one per env (e.g. a recorded episode); zeros after the end."""

    def __init__(self, actions: Sequence[np.ndarray]):
        self.actions = [np.asarray(a, dtype=np.float32) for a in actions]
        self.t = np.zeros(len(self.actions), dtype=np.int64)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        n = batch_size_of(obs)
        if n != len(self.actions):
            raise ValueError(f"ReplayPolicy holds {len(self.actions)} sequences, got a batch of {n}")
        out = np.zeros((n, self.actions[0].shape[1]), dtype=np.float32)
        for i, seq in enumerate(self.actions):
            if self.t[i] < len(seq):
                out[i] = seq[self.t[i]]
            self.t[i] += 1
        return out

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        ids = range(len(self.actions)) if env_ids is None else env_ids
        for i in ids:
            self.t[i] = 0
