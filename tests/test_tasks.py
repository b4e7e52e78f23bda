"""The shared object-state success predicate and the `object` observation key."""

import gymnasium as gym
import numpy as np
import pytest

import hma_gym  # noqa: F401
from hma_gym.tasks import LIFT, OBJECT_KEY, task_success

KEYS = ("agentview_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", OBJECT_KEY)


@pytest.fixture(scope="module")
def lift_env():
    env = gym.make("RobomimicLift-v0", obs_keys=KEYS, terminate_on_success=False)
    yield env
    env.close()


def test_predicate_by_hand():
    state = np.zeros((3, 10))
    state[:, 2] = [0.82, 0.8401, 0.95]  # resting, just past the 4 cm margin, lifted
    np.testing.assert_array_equal(LIFT.success(state), [False, True, True])
    np.testing.assert_array_equal(task_success("Lift", state[1]), True)
    with pytest.raises(ValueError, match=r"end in \(10,\)"):
        LIFT.success(np.zeros(9))
    with pytest.raises(ValueError, match="no object-state success predicate"):
        task_success("Stack", state)


def test_object_key_on_request_only(lift_env):
    default = gym.make("RobomimicLift-v0")
    try:
        assert OBJECT_KEY not in default.observation_space.spaces
    finally:
        default.close()
    obs, _ = lift_env.reset(seed=3)
    assert set(obs) == set(KEYS)
    assert obs[OBJECT_KEY].shape == (10,) and obs[OBJECT_KEY].dtype == np.float32
    assert lift_env.observation_space.contains(obs)
    rs = lift_env.unwrapped.robosuite_env
    cube = rs.sim.data.body_xpos[rs.cube_body_id]
    np.testing.assert_allclose(LIFT.field(obs[OBJECT_KEY], "cube_pos"), cube, atol=1e-5)
    with pytest.raises(ValueError, match="no observation 'cube_velocity'"):
        gym.make("RobomimicLift-v0", obs_keys=("cube_velocity",))


def test_predicate_gives_robosuite_verdict_on_recorded_states(lift_env):
    """The env's verdict is the shared predicate on the `object` observation it returns. robosuite samples
    observations early in each control period, so over an expert episode that verdict follows robosuite's
    `_check_success` on the live simulation by at most one step; on states set by hand (observations
    refreshed) the two agree exactly on either side of the margin."""
    from policies.scripted import LiftExpert

    env = lift_env.unwrapped
    expert = LiftExpert(lift_env, seed=0)
    obs, _ = lift_env.reset(seed=11)
    ours, robosuite = [], []
    for _ in range(80):
        batch = {k: v[None] for k, v in obs.items()}
        obs, reward, _, _, info = lift_env.step(expert.act(batch)[0])
        assert info["is_success"] == bool(LIFT.success(obs[OBJECT_KEY])) == (reward == 1.0)
        ours.append(info["is_success"])
        robosuite.append(bool(env.robosuite_env._check_success()))
    assert not ours[0] and ours[-1], "the expert episode should cross the margin"
    first_ours, first_rs = ours.index(True), robosuite.index(True)
    assert first_rs <= first_ours <= first_rs + 1
    assert ours[first_ours:] == robosuite[first_ours:]

    # cube heights straddling the margin, written into the MuJoCo state
    rs = env.robosuite_env
    qpos_addr = rs.sim.model.get_joint_qpos_addr(rs.cube.joints[0])[0]
    for dz in (-0.01, -1e-4, 1e-4, 0.01):
        lift_env.reset(seed=12)
        state = env.mujoco_state()
        state[1 + qpos_addr + 2] = LIFT.table_height + LIFT.lift_margin + dz  # (time, qpos..., qvel...)
        obs = env.set_state(state)
        assert bool(LIFT.success(obs[OBJECT_KEY])) == bool(rs._check_success()) == (dz > 0)
