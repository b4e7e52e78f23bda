"""Gymnasium environments: robosuite ground truth and learned HMA simulators."""

from hma_gym.envs.registration import GT_TASKS, LEARNED_TASKS, register_checkpoint, register_envs

__all__ = ["GT_TASKS", "LEARNED_TASKS", "register_checkpoint", "register_envs"]
