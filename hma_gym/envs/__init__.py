"""Gymnasium environments: robosuite ground truth and learned HMA simulators."""

from hma_gym.envs.registration import GT_TASKS, register_envs

__all__ = ["GT_TASKS", "register_envs"]
