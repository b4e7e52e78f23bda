"""hma-gym: learned action-video world models (HMA) as Gymnasium environments.

`import hma_gym` registers `RobomimicLift-v0` (MuJoCo ground truth) and its learned twin.
"""

from hma_gym.envs import register_checkpoint, register_envs
from hma_gym.rollout import RolloutResult, rollout

register_envs()

__all__ = ["RolloutResult", "register_checkpoint", "register_envs", "rollout"]
__version__ = "0.1.0"
