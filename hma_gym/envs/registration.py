"""Env ids registered on `import hma_gym`."""

from __future__ import annotations

import os

import gymnasium as gym

# id -> (robosuite task, max_episode_steps)
GT_TASKS: dict[str, tuple[str, int]] = {
    "RobomimicLift-v0": ("Lift", 100),
    "RobomimicStack-v0": ("Stack", 200),
}

# learned id -> (ground-truth id it mirrors, shipped checkpoint variant)
LEARNED_TASKS: dict[str, tuple[str, str]] = {
    "HMA-RobomimicLift-v0": ("RobomimicLift-v0", "maskgit"),
}

LEARNED_ENTRY = "hma_gym.envs.learned_env:HMAEnv"
LEARNED_VECTOR_ENTRY = "hma_gym.envs.learned_env:HMAVectorEnv"


def register_envs() -> None:
    """Register the ground-truth and learned ids (idempotent)."""
    for env_id, (task, max_steps) in GT_TASKS.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="hma_gym.envs.robosuite_env:RobosuiteEnv",
                max_episode_steps=max_steps,
                kwargs={"task": task, "robot": "Panda", "controller": "OSC_POSE", "image_size": 64},
            )
    for env_id, (gt_id, variant) in LEARNED_TASKS.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point=LEARNED_ENTRY,
                vector_entry_point=LEARNED_VECTOR_ENTRY,
                max_episode_steps=GT_TASKS[gt_id][1],
                kwargs={"variant": variant},
            )


def register_checkpoint(env_id: str, checkpoint: str | os.PathLike, max_episode_steps: int | None = None,
                        **kwargs) -> None:
    """Register a learned env id for a user's own packed checkpoint directory.

    `gym.make(env_id)` and `gym.make_vec(env_id, n, vectorization_mode="vector_entry_point")` then load
    it; extra `kwargs` (steps, temperature, device, ...) become the id's defaults.
    """
    from hma_gym.checkpoint import check_checkpoint_dir

    config = check_checkpoint_dir(checkpoint)
    if env_id in gym.registry:
        raise ValueError(f"env id {env_id!r} is already registered")
    gym.register(
        id=env_id,
        entry_point=LEARNED_ENTRY,
        vector_entry_point=LEARNED_VECTOR_ENTRY,
        max_episode_steps=max_episode_steps or config["env"].get("max_episode_steps"),
        kwargs={"checkpoint": os.fspath(checkpoint), **kwargs},
    )
