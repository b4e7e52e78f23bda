"""Env ids registered on `import hma_gym`."""

from __future__ import annotations

import gymnasium as gym

# id -> (robosuite task, max_episode_steps)
GT_TASKS: dict[str, tuple[str, int]] = {
    "RobomimicLift-v0": ("Lift", 100),
}


def register_envs() -> None:
    """Register the ground-truth ids (idempotent)."""
    for env_id, (task, max_steps) in GT_TASKS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="hma_gym.envs.robosuite_env:RobosuiteEnv",
            max_episode_steps=max_steps,
            kwargs={"task": task, "robot": "Panda", "controller": "OSC_POSE", "image_size": 64},
        )
