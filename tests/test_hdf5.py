"""robomimic-layout writer/reader: round trip, validation, crash safety, robomimic compatibility."""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from hma_gym.data.hdf5 import DatasetError, RobomimicWriter, list_demos, read_demo, validate_file

ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {}}


def _episode(writer, n, seed=0, states=True):
    rng = np.random.default_rng(seed)
    ep = writer.new_episode(model_file="<mujoco/>")
    for t in range(n):
        obs = {"agentview_image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
               "robot0_eef_pos": rng.normal(size=3).astype(np.float32)}
        nxt = {k: v.copy() for k, v in obs.items()}
        ep.add_step(obs, rng.uniform(-1, 1, 7), float(t == n - 1), t == n - 1, nxt,
                    state=rng.normal(size=10) if states else None)
    return writer.write_episode(ep, success=True)


def test_round_trip_and_masks(tmp_path):
    path = tmp_path / "a.hdf5"
    w = RobomimicWriter(path, ENV_ARGS, valid_every=3)
    names = [_episode(w, 5 + i, seed=i) for i in range(6)]
    assert names == [f"demo_{i}" for i in range(6)]
    info = validate_file(path)
    assert info["demos"] == 6 and info["samples"] == sum(5 + i for i in range(6))
    assert list_demos(path, "valid") == ["demo_2", "demo_5"]
    assert len(list_demos(path, "train")) == 4
    assert list_demos(path, "train_success") == list_demos(path, "train")  # every episode here succeeded
    demo = read_demo(path, "demo_1", next_obs=True)
    assert demo["actions"].shape == (6, 7) and demo["obs"]["agentview_image"].shape == (6, 8, 8, 3)
    assert demo["attrs"]["model_file"] == "<mujoco/>" and demo["dones"][-1] == 1
    # reopening appends after the last demo
    w2 = RobomimicWriter(path, ENV_ARGS, valid_every=3)
    assert _episode(w2, 4) == "demo_6"
    assert validate_file(path)["demos"] == 7


def test_validator_names_problems(tmp_path):
    path = tmp_path / "b.hdf5"
    w = RobomimicWriter(path, ENV_ARGS)
    _episode(w, 5)
    with h5py.File(path, "a") as f:
        del f["data/demo_0/rewards"]
        del f["mask/valid"]
    with pytest.raises(DatasetError) as err:
        validate_file(path)
    assert "demo_0: missing rewards" in str(err.value) and "mask/valid missing" in str(err.value)
    with pytest.raises(DatasetError, match="does not exist"):
        validate_file(tmp_path / "nope.hdf5")
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        validate_file(tmp_path / "junk.hdf5")


def test_states_required_unless_synthetic(tmp_path):
    path = tmp_path / "c.hdf5"
    _episode(RobomimicWriter(path, ENV_ARGS), 5, states=False)
    with pytest.raises(DatasetError, match="missing states"):
        validate_file(path)
    synth = tmp_path / "s.hdf5"
    _episode(RobomimicWriter(synth, {**ENV_ARGS, "synthetic": True}), 5, states=False)
    assert validate_file(synth)["demos"] == 1


def test_incomplete_demo_is_dropped_on_reopen(tmp_path):
    path = tmp_path / "d.hdf5"
    w = RobomimicWriter(path, ENV_ARGS)
    _episode(w, 5)
    _episode(w, 5)
    with h5py.File(path, "a") as f:  # what a kill in the middle of writing demo_1 leaves behind
        del f["data/demo_1"].attrs["num_samples"]
    RobomimicWriter(path, ENV_ARGS)
    info = validate_file(path)
    assert info["demos"] == 1 and info["samples"] == 5


def test_append_refuses_other_env(tmp_path):
    path = tmp_path / "e.hdf5"
    _episode(RobomimicWriter(path, ENV_ARGS), 3)
    with pytest.raises(DatasetError, match="cannot append"):
        RobomimicWriter(path, {**ENV_ARGS, "env_name": "Stack"})


def _demos_or_zero(path):
    """Demos in a file another process is writing; 0 while unreadable (h5py raises RuntimeError, too, when it
    reads metadata mid-update: once in a stress run of 25 collections polled every <50 ms, and once as a failure of
    the test below)."""
    try:
        return validate_file(path)["demos"]
    except (DatasetError, OSError, KeyError, RuntimeError):
        return 0


@pytest.mark.slow
def test_killed_collection_reopens_and_appends(tmp_path):
    """SIGKILL a collecting process: the file stays valid and a new collection appends to it."""
    path = str(tmp_path / "kill.hdf5")
    cmd = [sys.executable, "-m", "hma_gym.cli", "collect", "--out", path, "--episodes", "50",
           "--image-size", "16", "--no-progress", "--failure-probs", json.dumps({})]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # polled by lock-free reads
    deadline = time.time() + 300
    try:
        while _demos_or_zero(path) < 2 and time.time() < deadline:
            assert proc.poll() is None, "collection ended before it was killed"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    info = validate_file(path)
    assert 2 <= info["demos"] < 50
    subprocess.run([*cmd[:7], "1", *cmd[8:]], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = validate_file(path)
    assert after["demos"] == info["demos"] + 1
    assert list_demos(path) == [f"demo_{i}" for i in range(after["demos"])]


@pytest.mark.slow
def test_robomimic_sequence_dataset_reads_collected_file(tmp_path):
    import gymnasium as gym

    import hma_gym
    from policies import LiftExpert

    path = tmp_path / "rm.hdf5"
    env = gym.make("RobomimicLift-v0", image_size=32, terminate_on_success=False)
    args = env.unwrapped.env_args()
    writer = RobomimicWriter(path, args, valid_every=2)
    hma_gym.rollout(env, LiftExpert(env, seed=0), 2, seeds=0, writer=writer, steps_after_success=3,
                    progress=False)
    env.close()
    assert validate_file(path)["demos"] == 2

    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    ObsUtils.initialize_obs_utils_with_obs_specs(
        {"obs": {"low_dim": ["robot0_eef_pos", "robot0_gripper_qpos"], "rgb": ["agentview_image"]}}
    )
    ds = SequenceDataset(hdf5_path=str(path), obs_keys=["agentview_image", "robot0_eef_pos"],
                         dataset_keys=["actions", "rewards", "dones"], seq_length=8, frame_stack=1,
                         pad_seq_length=True, pad_frame_stack=True, hdf5_cache_mode="low_dim",
                         filter_by_attribute="train", load_next_obs=True)
    sample = ds[0]
    assert sample["actions"].shape == (8, 7)
    assert sample["obs"]["agentview_image"].shape == (8, 32, 32, 3)
    assert len(ds) == read_demo(path, "demo_0")["actions"].shape[0]
