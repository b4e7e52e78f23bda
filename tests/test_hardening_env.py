"""Issue 28, the env side: starts and checkpoints that would give NaN are refused, reset options are checked in
both envs, the async vector env and RecordVideo work for both ids, close() releases or reopens, and the native
vector env's info matches SyncVectorEnv's."""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hma_gym.checkpoint import CheckpointError, check_checkpoint_dir
from hma_gym.envs.learned_env import ASSETS, START_STD_LIMIT, VARIANTS, HMAEnv, HMAVectorEnv
from hma_gym.envs.robosuite_env import RobosuiteEnv

# one torch thread: on this busy 2-core machine two OpenMP threads make the shipped models' steps many times slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ASSETS / VARIANTS["fast"]  # the smallest shipped checkpoint (64x64, 2 layers)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fast_env():
    env = HMAEnv(variant="fast")
    yield env
    env.close()


def gt_start(seed: int) -> dict[str, np.ndarray]:
    gt = RobosuiteEnv()
    try:
        return gt.reset(seed=seed)[0]
    finally:
        gt.close()


def all_finite(obs: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in obs.values())


# ---------------------------------------------------------------- 1. absurd starts, NaN episodes

def test_absurd_start_is_refused_naming_the_key_and_range(fast_env):
    start = gt_start(0)
    for value in (1e30, 1e3, -1e3):
        bad = {**start, "robot0_eef_pos": np.array([value, 0.0, 1.0], np.float32)}
        with pytest.raises(ValueError, match=r"robot0_eef_pos\[0\] = \S+ is outside \[-\S+, \S+\]"):
            fast_env.reset(seed=0, options={"initial_observation": bad})
    # the env is still usable, and a real start steps to finite values
    fast_env.reset(seed=0, options={"initial_observation": start})
    assert all_finite(fast_env.step(np.zeros(7, np.float32))[0])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_bank_start_and_gt_reset_passes_the_range_check(variant):
    env = HMAEnv(variant=variant)  # loading checks every bank entry
    sim = env.sim
    bank = load_file(str(ASSETS / VARIANTS[variant] / "init_bank.safetensors"))
    for i in range(len(bank["agentview_image"])):
        sim.check_observation({k: v[i].numpy() for k, v in bank.items()})
    gt = RobosuiteEnv(obs_keys=tuple(sim.model_space.spaces))  # a paired start holds the model's whole state
    for seed in range(6):
        sim.check_observation(gt.reset(seed=seed)[0])
    gt.close()
    # how wide the range is: the shipped statistics allow every unit quaternion
    low, high = sim.state_low[3:7], sim.state_high[3:7]
    assert (low <= -1).all() and (high >= 1).all() and START_STD_LIMIT >= 100
    env.close()


def test_a_reset_after_a_nan_episode_steps_finite(fast_env):
    """A row that went NaN (an absurd start put in behind the check) is clean again after its reset."""
    start = fast_env.sim.check_observation(gt_start(1))  # every key the model needs (its `object` too)
    absurd = {**start, "robot0_eef_pos": np.full(3, 1e30, np.float32)}
    venv = HMAVectorEnv(2, variant="fast")
    venv.reset(seed=0)
    venv.sim.reset_rows(np.array([1]), [absurd])
    obs = venv.step(np.zeros((2, 7), np.float32))[0]
    assert not np.isfinite(obs["robot0_eef_pos"][1]).all(), "the setup should poison row 1"
    venv.reset(seed=[None, 3], options={"reset_mask": np.array([False, True])})
    for _ in range(3):
        obs = venv.step(np.zeros((2, 7), np.float32))[0]
        assert all_finite(obs)
    venv.close()
    # the single env: a clean reset(seed=...) after a NaN episode
    fast_env.sim.reset_rows(np.array([0]), [absurd])
    assert not all_finite(fast_env.step(np.zeros(7, np.float32))[0])
    fast_env.reset(seed=2)
    assert all_finite(fast_env.step(np.zeros(7, np.float32))[0])


# ---------------------------------------------------------------- 2. checkpoints checked at load

def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _poison_first(name: str, value: float):
    def edit(tensors):
        key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return edit


def _set(key: str, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key].clone())
    return edit


CORRUPTIONS = {
    # case: (file, edit, the words the error must contain)
    "nan dynamics weight": ("dynamics.safetensors", _poison_first("dynamics", float("nan")), ["NaN/inf"]),
    "inf tokenizer weight": ("tokenizer.safetensors", _poison_first("tokenizer", float("inf")), ["NaN/inf"]),
    "nan detector weight": ("detector.safetensors", _poison_first("detector", float("nan")), ["NaN/inf"]),
    "zero state_std": ("normalization.safetensors", _set("panda_osc_pose/state_std", lambda t: t * 0),
                       ["state_std", "> 0"]),
    "nan state_mean": ("normalization.safetensors",
                       _set("panda_osc_pose/state_mean", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
                       ["state_mean", "NaN/inf"]),
    "short action_std": ("normalization.safetensors", _set("panda_osc_pose/action_std", lambda t: t[:6]),
                         ["action_std", "(7,)"]),
    "zero detector std": ("detector_normalization.safetensors", _set("state_std", lambda t: t * 0),
                          ["state_std", "> 0"]),
    "nan bank": ("init_bank.safetensors",
                 _set("robot0_eef_quat", lambda t: t.index_fill(0, torch.tensor([2]), float("nan"))),
                 ["robot0_eef_quat", "NaN/inf"]),
    "absurd bank": ("init_bank.safetensors",
                    _set("robot0_eef_pos", lambda t: t.index_fill(0, torch.tensor([2]), 1e30)),
                    ["robot0_eef_pos", "outside"]),
    "empty bank": ("init_bank.safetensors", lambda ts: ts.update({k: v[:0].clone() for k, v in ts.items()}),
                   ["no initial observation"]),
    "image_size": ("config.json", lambda c: c["env"].update(image_size=32), ["env.image_size", "64x64"]),
    "proprio size": ("config.json", lambda c: c["env"].update(proprio=[["robot0_eef_pos", 4],
                                                                       *c["env"]["proprio"][1:]]),
                     ["env.proprio", "10 state values", "takes 9"]),
    "action_dim": ("config.json", lambda c: c["env"].update(action_dim=6), ["env.action_dim", "takes 7"]),
    "embodiment": ("config.json", lambda c: c["env"].update(embodiment="ur5e"), ["env.embodiment", "ur5e"]),
    "steps 1e6": ("config.json", lambda c: c["generation"].update(steps=10**6), ["generation.steps", "[1, 256]"]),
    "steps 0": ("config.json", lambda c: c["generation"].update(steps=0), ["generation.steps"]),
    "threshold": ("config.json", lambda c: c["generation"].update(success_threshold=1.5),
                  ["generation.success_threshold"]),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_at_load_naming_file_and_field(case, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FAST, path)
    name, edit, words = CORRUPTIONS[case]
    if name == "config.json":
        _edit_config(path, edit)
    else:
        _edit_tensors(path / name, edit)
    with pytest.raises(CheckpointError) as err:
        HMAEnv(checkpoint=path)
    message = str(err.value)
    assert name in message, message
    for word in words:
        assert word in message, message
    if name == "config.json":  # also refused where only the directory is checked (register_checkpoint, serve)
        with pytest.raises(CheckpointError, match="config.json"):
            check_checkpoint_dir(path)


def test_generation_steps_argument_is_bounded():
    with pytest.raises(ValueError, match=r"steps .* must be in \[1, 256\]"):
        HMAEnv(variant="fast", steps=10**6)


# ---------------------------------------------------------------- 5. the GT env's reset options

def test_gt_reset_refuses_unknown_or_malformed_options():
    env = RobosuiteEnv(use_camera=False)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="cannot start from a given observation"):
        env.reset(seed=0, options={"initial_observation": obs})
    with pytest.raises(ValueError, match=r"unknown reset options \['start'\]"):
        env.reset(options={"start": 1})
    with pytest.raises(ValueError, match="must be a dict or None, got list"):
        env.reset(options=["initial_observation"])
    again, _ = env.reset(seed=0, options={})  # empty options (what a vector env passes) are fine
    np.testing.assert_array_equal(again["robot0_eef_pos"], obs["robot0_eef_pos"])
    env.close()


def test_learned_reset_refuses_malformed_options(fast_env):
    with pytest.raises(ValueError, match="must be a dict or None, got str"):
        fast_env.reset(options="initial_observation")
    with pytest.raises(ValueError, match="must be a dict of arrays"):
        fast_env.reset(options={"initial_observation": [1, 2]})


# ---------------------------------------------------------------- 9. gymnasium's async vector env (fork)

def _run_script(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a user's script); kill its whole process group on a hang, since
    forked workers outlive their parent."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the script hung for {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_async_vector_env_of_the_gt_id_steps():
    result = _run_script("""
        import gymnasium as gym, numpy as np, hma_gym
        env = gym.make_vec("RobomimicLift-v0", num_envs=2, vectorization_mode="async")
        obs, _ = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(np.zeros((2, 7), np.float32))
        assert obs["agentview_image"].shape == (2, 64, 64, 3) and obs["agentview_image"].std() > 0
        env.close()
        print("stepped")
    """, timeout=150)
    assert result.returncode == 0 and "stepped" in result.stdout, result.stderr[-2000:]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_async_gt_env_after_rendering_in_the_parent_fails_at_once_saying_what_to_pass():
    result = _run_script("""
        import gymnasium as gym, hma_gym
        gym.make("RobomimicLift-v0").reset(seed=0)  # Mesa starts in this process
        env = gym.make_vec("RobomimicLift-v0", num_envs=2, vectorization_mode="async")
        try:
            env.reset(seed=0)
        except RuntimeError as e:
            print("refused:", e)
    """, timeout=150)
    assert "refused:" in result.stdout and "vector_kwargs={'context': 'spawn'}" in result.stdout, result.stderr[-2000:]


@pytest.mark.timeout(180)
def test_async_vector_env_of_the_learned_id_steps():
    # this process runs multi-threaded torch (OpenMP) before gymnasium forks its workers
    torch.set_num_threads(2)
    x = torch.randn(256, 256)
    (x @ x).sum()
    env = gym.make_vec("HMA-RobomimicLift-v0", num_envs=2, vectorization_mode="async", variant="fast")
    try:
        env.reset(seed=0)
        for _ in range(2):
            obs, reward, terminated, truncated, info = env.step(np.zeros((2, 7), np.float32))
        assert obs["agentview_image"].shape == (2, 64, 64, 3) and all_finite(obs)
    finally:
        env.close(terminate=True)


# ---------------------------------------------------------------- 10. close()

@pytest.mark.slow
def test_gt_env_reopens_after_close_and_passes_sb3_render_check():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("RobomimicLift-v0", render_mode="rgb_array", image_size=16).unwrapped
    sb3_check_env(env, warn=True, skip_render_check=False)  # render, close, then reset and step again
    first, _ = env.reset(seed=4)
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(np.zeros(7, np.float32))
    again, _ = env.reset(seed=4)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    env.close()


@pytest.mark.slow
def test_closed_learned_env_releases_its_model():
    env = HMAEnv(variant="fast")
    env.reset(seed=0)
    model = weakref.ref(env.sim.wm)
    env.close()
    gc.collect()
    assert model() is None, "close() should drop the world model"
    with pytest.raises(RuntimeError, match="closed"):
        env.step(np.zeros(7, np.float32))
    obs, _ = env.reset(seed=0)  # loads it again
    assert all_finite(env.step(np.zeros(7, np.float32))[0])
    env.close()

    venv = HMAVectorEnv(2, variant="fast")
    model = weakref.ref(venv.sim.wm)
    venv.close()
    gc.collect()
    assert model() is None
    with pytest.raises(RuntimeError, match="closed"):
        venv.step(np.zeros((2, 7), np.float32))


# ---------------------------------------------------------------- 11. RecordVideo

@pytest.mark.parametrize("env_id,kwargs", [("RobomimicLift-v0", {}), ("HMA-RobomimicLift-v0", {"variant": "fast"})])
@pytest.mark.slow
def test_record_video_writes_an_mp4(env_id, kwargs, tmp_path):
    env = gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array", max_episode_steps=4, **kwargs),
                                   str(tmp_path), episode_trigger=lambda episode: True, disable_logger=True)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(7, np.float32))
        done = terminated or truncated
    env.close()
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


# ---------------------------------------------------------------- 13. the native vector env's info

def test_native_vector_info_has_the_keys_and_dtypes_of_sync_vector_env():
    infos = {}
    for mode in ("sync", "vector_entry_point"):
        env = gym.make_vec("HMA-RobomimicLift-v0", num_envs=2, vectorization_mode=mode, variant="fast")
        _, reset_info = env.reset(seed=0)
        step_info = env.step(np.zeros((2, 7), np.float32))[-1]
        infos[mode] = [{k: (np.asarray(v).dtype, np.shape(v)) for k, v in info.items()}
                       for info in (reset_info, step_info)]
        assert step_info["_is_success"].all() and step_info["_success_prob"].all()
        env.close()
    assert infos["vector_entry_point"] == infos["sync"]
    keys = set(infos["sync"][1])
    assert {"is_success", "_is_success", "success_prob", "_success_prob"} <= keys
    assert all(f"_{k}" in keys for k in keys if not k.startswith("_"))
