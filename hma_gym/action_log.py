"""Action logs: the JSON record of a driven episode that `serve` writes and `play` replays.

`{"version": 1, "env_id": ..., "seed": s, "env_kwargs": {...}, "actions": [[...], ...]}`. Replaying
means the paired start of DESIGN.md (`gt.reset(seed=s)`, then the learned env reset from that
observation with the same seed) followed by the actions in order.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

ACTION_LOG_VERSION = 1


@dataclass
class ActionLog:
    env_id: str
    seed: int
    actions: list[list[float]] = field(default_factory=list)
    env_kwargs: dict = field(default_factory=dict)
    version: int = ACTION_LOG_VERSION

    def __post_init__(self):
        if self.version != ACTION_LOG_VERSION:
            raise ValueError(f"action log version {self.version!r} is not supported (expected {ACTION_LOG_VERSION})")
        if not isinstance(self.env_id, str) or not self.env_id:
            raise ValueError(f"action log env_id must be a non-empty string. Got {self.env_id!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"action log seed must be an integer. Got {self.seed!r}")
        arr = np.asarray(self.actions, dtype=np.float64) if self.actions else np.zeros((0, 0))
        if self.actions and (arr.ndim != 2 or not np.all(np.isfinite(arr))):
            raise ValueError("action log actions must be a list of equally long lists of finite numbers")

    def append(self, action) -> None:
        self.actions.append([float(x) for x in np.asarray(action, dtype=np.float64).reshape(-1)])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> ActionLog:
        if not isinstance(d, dict):
            raise ValueError("an action log is a JSON object")
        missing = {"version", "env_id", "seed", "actions"} - set(d)
        if missing:
            raise ValueError(f"action log lacks {sorted(missing)}")
        unknown = set(d) - {"version", "env_id", "seed", "actions", "env_kwargs"}
        if unknown:
            raise ValueError(f"action log has unknown fields {sorted(unknown)}")
        return cls(env_id=d["env_id"], seed=d["seed"], actions=d["actions"], env_kwargs=d.get("env_kwargs", {}),
                   version=d["version"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActionLog:
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
