"""Contract of the ground-truth env `RobomimicLift-v0`."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from hma_gym.envs.robosuite_env import RobosuiteEnv


def test_spaces_match_design(lift_env):
    space = lift_env.observation_space
    assert set(space.spaces) == {"agentview_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"}
    assert space["agentview_image"].shape == (64, 64, 3) and space["agentview_image"].dtype == np.uint8
    assert space["robot0_eef_pos"].shape == (3,) and space["robot0_eef_pos"].dtype == np.float32
    assert space["robot0_eef_quat"].shape == (4,)
    assert space["robot0_gripper_qpos"].shape == (2,)
    assert lift_env.action_space == gym.spaces.Box(-1, 1, (7,), np.float32)
    assert lift_env.spec.max_episode_steps == 100
    assert lift_env.metadata["render_fps"] == 20
    obs, info = lift_env.reset(seed=0)
    assert lift_env.observation_space.contains(obs)
    assert "is_success" in info
    # privileged state is available but not observed
    assert "cube_pos" in lift_env.unwrapped.privileged_state() and "cube_pos" not in obs


@pytest.mark.slow
def test_gymnasium_and_sb3_checkers():
    env = gym.make("RobomimicLift-v0", render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(env.unwrapped, warn=True)
    env.close()


def test_seeded_reset_is_reproducible(lift_env):
    a, _ = lift_env.reset(seed=3)
    cube_a = lift_env.unwrapped.privileged_state()["cube_pos"]
    lift_env.reset(seed=4)
    cube_other = lift_env.unwrapped.privileged_state()["cube_pos"]
    b, _ = lift_env.reset(seed=3)
    cube_b = lift_env.unwrapped.privileged_state()["cube_pos"]
    np.testing.assert_allclose(cube_a, cube_b)
    assert np.abs(cube_a - cube_other).max() > 1e-4, "a different seed should move the cube"
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # and the same actions give the same trajectory
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 7)).astype(np.float32)
    runs = []
    for _ in range(2):
        lift_env.reset(seed=3)
        runs.append([lift_env.step(act)[0]["robot0_eef_pos"] for act in actions])
    np.testing.assert_allclose(runs[0], runs[1])


def test_two_instances_build_the_same_scene(lift_env):
    """robosuite draws Lift's cube size once per instance: the fixed scene seed makes instances agree."""
    other = gym.make("RobomimicLift-v0")
    try:
        a, _ = lift_env.reset(seed=7)
        b, _ = other.reset(seed=7)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        sizes = [env.unwrapped._rs.cube.size for env in (lift_env, other)]
        np.testing.assert_array_equal(sizes[0], sizes[1])
    finally:
        other.close()


def test_bad_actions_raise_and_leave_env_usable(lift_env):
    lift_env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        lift_env.step(np.zeros(6, dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        lift_env.step(np.array([np.nan] + [0.0] * 6, dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        lift_env.step(np.array([np.inf] + [0.0] * 6, dtype=np.float32))
    obs, reward, terminated, truncated, info = lift_env.step(np.zeros(7, dtype=np.float32))
    assert lift_env.observation_space.contains(obs)


def test_out_of_range_actions_are_clipped():
    env = RobosuiteEnv(use_camera=False)
    big = np.array([5.0, -5.0, 5.0, 0, 0, 0, 5.0], dtype=np.float32)
    env.reset(seed=1)
    a = env.step(big)[0]["robot0_eef_pos"]
    env.reset(seed=1)
    b = env.step(np.clip(big, -1, 1))[0]["robot0_eef_pos"]
    np.testing.assert_allclose(a, b)
    env.close()


def test_image_is_upright_and_render_returns_frame():
    env = gym.make("RobomimicLift-v0", render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    img = obs["agentview_image"].astype(np.float32)
    # upright: the robot (grey/black) enters from the top edge, the bottom rows are white table
    assert img[:6].mean() < img[-6:].mean() - 40
    np.testing.assert_array_equal(env.render(), obs["agentview_image"])
    env.close()


def test_image_size_is_configurable():
    env = gym.make("RobomimicLift-v0", image_size=32)
    obs, _ = env.reset(seed=0)
    assert obs["agentview_image"].shape == (32, 32, 3)
    env.close()


@pytest.mark.slow
def test_truncation_at_100_steps():
    env = gym.make("RobomimicLift-v0", use_camera=False)
    env.reset(seed=0)
    for _t in range(100):
        _, _, terminated, truncated, _ = env.step(np.zeros(7, dtype=np.float32))
        assert not terminated
    assert truncated
    env.close()


def test_step_before_reset_raises():
    env = RobosuiteEnv(use_camera=False)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(7, dtype=np.float32))
    env.close()


@pytest.mark.slow
def test_two_envs_in_one_process_render_their_own_scene():
    a, b = RobosuiteEnv(), RobosuiteEnv()
    oa, _ = a.reset(seed=0)
    ob, _ = b.reset(seed=1)
    oa2 = a.set_state(a.mujoco_state())  # re-render env a after env b drew
    np.testing.assert_array_equal(oa["agentview_image"], oa2["agentview_image"])
    assert np.abs(oa["agentview_image"].astype(int) - ob["agentview_image"].astype(int)).max() > 0
    a.close()
    b.close()


@pytest.mark.slow
def test_stack_id_and_other_arms_pass_the_checker():
    """The second task, and another arm/controller through the Lift id's kwargs, keep the env contract."""
    stack = gym.make("RobomimicStack-v0", image_size=16)
    check_env(stack.unwrapped, skip_render_check=True)
    assert stack.spec.max_episode_steps == 200
    stack.close()
    iiwa = gym.make("RobomimicLift-v0", image_size=16, robot="IIWA", controller="OSC_POSITION")
    check_env(iiwa.unwrapped, skip_render_check=True)
    assert iiwa.action_space.shape == (4,)
    assert iiwa.observation_space["robot0_gripper_qpos"].shape == (6,)
    iiwa.close()
