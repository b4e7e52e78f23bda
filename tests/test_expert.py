"""The scripted Lift expert: clean success rate, failure modes, batching."""

import gymnasium as gym
import pytest

import hma_gym
from policies import LiftExpert, LiftExpertConfig


@pytest.mark.slow
def test_clean_expert_succeeds():
    env = gym.make("RobomimicLift-v0", use_camera=False)
    result = hma_gym.rollout(env, LiftExpert(env, seed=0), 6, seeds=1000, progress=False)
    assert result.success_rate == 1.0, result.to_dict()
    env.close()


@pytest.mark.parametrize("mode", ["missed_grasp", "early_release"])
@pytest.mark.slow
def test_failure_modes_fail(mode):
    env = gym.make("RobomimicLift-v0", use_camera=False, terminate_on_success=False)
    expert = LiftExpert(env, LiftExpertConfig(failure_probs={mode: 1.0}), seed=0)
    result = hma_gym.rollout(env, expert, 2, seeds=2000, progress=False)
    assert result.success_rate == 0.0
    assert all(ep.length == 100 for ep in result.episodes)
    env.close()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="unknown failure modes"):
        LiftExpertConfig(failure_probs={"teleport": 0.5})
    with pytest.raises(ValueError, match="sum to at most 1"):
        LiftExpertConfig(failure_probs={"missed_grasp": 0.7, "hesitation": 0.7})


@pytest.mark.slow
def test_vector_rollout_matches_single_env():
    """A SyncVectorEnv of 2 runs the same seeded episodes as a single env, in waves."""
    kwargs = dict(use_camera=False)
    single = gym.make("RobomimicLift-v0", **kwargs)
    r1 = hma_gym.rollout(single, LiftExpert(single, seed=5), 3, seeds=300, progress=False)
    vec = gym.vector.SyncVectorEnv([lambda: gym.make("RobomimicLift-v0", **kwargs) for _ in range(2)])
    r2 = hma_gym.rollout(vec, LiftExpert(vec, seed=5), 3, seeds=300, progress=False)
    assert [e.seed for e in r2.episodes] == [300, 301, 302]
    assert [e.length for e in r1.episodes] == [e.length for e in r2.episodes]
    assert [e.success for e in r1.episodes] == [e.success for e in r2.episodes]
    single.close()
    vec.close()
