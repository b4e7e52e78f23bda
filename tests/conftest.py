import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402

import hma_gym  # noqa: E402,F401  (registers the env ids)


@pytest.fixture(scope="module")
def lift_env():
    env = gym.make("RobomimicLift-v0")
    yield env
    env.close()
