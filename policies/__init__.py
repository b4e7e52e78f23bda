"""Policies behind one small batched protocol (`act`, `reset`)."""

from policies.base import Policy, RandomPolicy, ReplayPolicy, batch_size_of
from policies.scripted import LiftExpert, LiftExpertConfig

__all__ = ["LiftExpert", "LiftExpertConfig", "Policy", "RandomPolicy", "ReplayPolicy", "batch_size_of"]
