"""Issue 25's interaction data: the policy bank (random, smooth random, zero, graded expert failure modes) and
`collect` recording robomimic's `object` key, resumable with --total."""

import gymnasium as gym
import h5py
import numpy as np
import pytest

import hma_gym  # noqa: F401
from hma_gym.tasks import LIFT, OBJECT_KEY
from policies.base import ConstantPolicy, SmoothRandomPolicy
from policies.registry import load_policy
from policies.scripted import FAILURE_MODES, LiftExpert, LiftExpertConfig, expert_config_from_spec
from training.collect import CollectConfig, collect

OBS = {"robot0_eef_pos": np.zeros((3, 3), np.float32)}


def test_smooth_random_is_correlated_and_bounded():
    policy = SmoothRandomPolicy(rho=0.9, seed=0)
    a = np.stack([policy.act(OBS) for _ in range(3000)])  # (T, 3, 7)
    assert a.min() >= -1 and a.max() <= 1
    x = a[:, :, 0].T  # (envs, T)
    lag1 = np.mean([np.corrcoef(row[:-1], row[1:])[0, 1] for row in x])
    assert 0.8 < lag1 < 0.95
    white_policy = SmoothRandomPolicy(rho=0.0, seed=1)
    white = np.stack([white_policy.act(OBS) for _ in range(2000)])[:, 0, 0]
    assert abs(np.corrcoef(white[:-1], white[1:])[0, 1]) < 0.1
    policy.reset([1])  # one env's process restarts, the others keep theirs
    assert policy.state.shape == (3, 7)
    with pytest.raises(ValueError, match="rho"):
        SmoothRandomPolicy(rho=1.0)
    np.testing.assert_array_equal(ConstantPolicy().act(OBS), np.zeros((3, 7)))


def test_expert_spec_parsing():
    cfg = expert_config_from_spec("missed_grasp=0.03,noise=0.2")
    assert cfg.failure_probs == {"missed_grasp": 1.0} and cfg.severity == {"missed_grasp": (0.03, 0.03)}
    assert cfg.action_noise == 0.2
    assert expert_config_from_spec("").failure_probs == {}
    for bad, match in (("fly", "unknown option 'fly'"), ("push=far", "could not convert"),
                       ("push,never_close", "name one failure mode"), ("push=0.5", "severity")):
        with pytest.raises(ValueError, match=match):
            expert_config_from_spec(bad)
    with pytest.raises(ValueError, match="no severity for"):
        LiftExpertConfig(severity={"never_close": (0.0, 0.1)})
    with pytest.raises(ValueError, match="random-smooth:RHO"):
        load_policy("random-smooth:x")


@pytest.fixture(scope="module")
def lift_env():
    env = gym.make("RobomimicLift-v0", terminate_on_success=False,
                   obs_keys=("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", OBJECT_KEY))
    yield env
    env.close()


def run_expert(env, spec: str, seed: int, steps: int = 90) -> tuple[bool, float, np.ndarray]:
    """(success at some step, max cube height above its start, gripper commands) of one episode."""
    policy = load_policy(spec, env, seed=0)
    obs, _ = env.reset(seed=seed)
    z0, top, success, grip = LIFT.field(obs[OBJECT_KEY], "cube_pos")[2], 0.0, False, []
    for _ in range(steps):
        action = policy.act({k: v[None] for k, v in obs.items()})[0]
        grip.append(action[6])
        obs, _, _, _, info = env.step(action)
        top = max(top, float(LIFT.field(obs[OBJECT_KEY], "cube_pos")[2] - z0))
        success |= info["is_success"]
    return success, top, np.asarray(grip)


@pytest.mark.slow
def test_failure_modes_do_what_they_say(lift_env):
    """Each mode in MuJoCo: the clean expert lifts; never_close never commands a close; a 6 cm missed grasp,
    a push and closing at the hover height (6.5 cm early) fail; the expert reads the cube from `object` when
    the env has no privileged state (checked by comparing the two sources)."""
    ok, top, grip = run_expert(lift_env, "lift-expert", seed=5)
    assert ok and top > 0.1
    ok, top, grip = run_expert(lift_env, "lift-expert:never_close", seed=5)
    assert not ok and grip.max() < 0
    for spec in ("lift-expert:missed_grasp=0.06", "lift-expert:push=0.03", "lift-expert:close_early=0.065"):
        ok, top, _ = run_expert(lift_env, spec, seed=5)
        assert not ok and top < LIFT.lift_margin - 0.015, spec
    assert set(FAILURE_MODES) >= {"never_close", "close_early", "close_late", "release_mid_lift", "push"}

    expert = LiftExpert(lift_env, seed=0)
    obs, _ = lift_env.reset(seed=6)
    batch = {k: v[None] for k, v in obs.items()}
    privileged = expert._cube(0, batch)

    class NoPrivilege:  # a stand-in for a learned env that returns `object`
        action_space = lift_env.action_space

    expert.envs = [NoPrivilege()]
    np.testing.assert_allclose(expert._cube(0, batch), privileged, atol=2e-3)


@pytest.mark.slow
def test_collect_records_object_and_resumes(tmp_path):
    out = tmp_path / "mix.hdf5"
    base = dict(out=str(out), policy="random-smooth", seed=123_000, max_steps=6, progress=False)
    assert collect(CollectConfig(total=2, **base))["episodes_added"] == 2
    assert collect(CollectConfig(total=3, **base))["episodes_added"] == 1
    assert collect(CollectConfig(total=3, **base))["episodes_added"] == 0
    with h5py.File(out, "r") as f:
        demos = sorted(f["data"])
        assert len(demos) == 3
        assert [int(f["data"][d].attrs["seed"]) for d in demos] == [123_000, 123_001, 123_002]
        obj = f["data/demo_0/obs"][OBJECT_KEY][()]
        assert obj.shape == (6, 10) and np.isfinite(obj).all()
        assert 0.8 < LIFT.field(obj, "cube_pos")[0, 2] < 0.84  # resting on the table

    # robomimic's own dataset reads the key back
    pytest.importorskip("robomimic")
    import robomimic.utils.obs_utils as obs_utils
    from robomimic.utils.dataset import SequenceDataset

    obs_utils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": [OBJECT_KEY, "robot0_eef_pos"], "rgb": []}})
    ds = SequenceDataset(hdf5_path=str(out), obs_keys=(OBJECT_KEY, "robot0_eef_pos"), dataset_keys=("actions",),
                         seq_length=2, hdf5_cache_mode=None, hdf5_use_swmr=False, load_next_obs=False)
    item = ds[0]
    assert item["obs"][OBJECT_KEY].shape == (2, 10)
    np.testing.assert_allclose(item["obs"][OBJECT_KEY][0], obj[0], rtol=1e-6)
