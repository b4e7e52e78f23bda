"""Heterogeneous pre-training (issue 8): several embodiments in one batch, new stems on a trained trunk."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hma_gym.cli import main
from hma_gym.data.hdf5 import DatasetError, read_demo, read_env_args
from tests.conftest import DYN_ARGS, read_log
from training.data import DataConfig, Normalizer, load_episodes
from training.mixture import Source, mixed_batch, read_mixture, sampling_weights

STAT_KEYS = ("state_mean", "state_std", "action_mean", "action_std")


@pytest.fixture(scope="module")
def iiwa_data(tmp_path_factory) -> Path:
    """4 IIWA episodes under OSC_POSITION (4-D actions, 6-D gripper qpos) at 16x16."""
    path = tmp_path_factory.mktemp("data") / "iiwa16.hdf5"
    main(["collect", "--out", str(path), "--robot", "IIWA", "--controller", "OSC_POSITION", "--episodes", "4",
          "--image-size", "16", "--no-progress", "--valid-every", "2", "--steps-after-success", "3", "--seed", "7"])
    return path


@pytest.fixture(scope="module")
def mixture_run(tiny_data, iiwa_data, tokenizer_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    spec = root / "mixture.json"
    spec.write_text(json.dumps({"datasets": [{"data": str(tiny_data)}, {"data": str(iiwa_data)}]}))
    out = root / "run"
    main(["train", "--mixture", str(spec), "--tokenizer", str(tokenizer_run), "--out", str(out), "--steps", "16",
          "--eval-every", "16", "--save-every", "16", "--mixture-power", "0", *DYN_ARGS])
    return out


@pytest.mark.slow
def test_collect_other_robot_records_its_own_action_space(iiwa_data):
    args = read_env_args(iiwa_data)
    assert args["embodiment"] == "iiwa_osc_position"
    demo = read_demo(iiwa_data, "demo_0")
    assert demo["actions"].shape[1] == 4
    assert demo["obs"]["robot0_gripper_qpos"].shape[1] == 6
    with h5py.File(iiwa_data, "r") as f:  # each demo records the seed its episode started from
        assert [int(f[f"data/demo_{k}"].attrs["seed"]) for k in range(4)] == [7, 8, 9, 10]


@pytest.mark.slow
def test_stack_expert_collects_a_second_task(tmp_path):
    """Stack (a second task) with the Panda: the scripted expert picks cube A and sets it on cube B."""
    path = tmp_path / "stack16.hdf5"
    main(["collect", "--task", "stack", "--out", str(path), "--episodes", "2", "--image-size", "16",
          "--no-progress", "--steps-after-success", "2", "--seed", "0"])
    args = read_env_args(path)
    assert args["env_name"] == "Stack" and args["collector"] == "stack-expert"
    assert args["embodiment"] == "panda_osc_pose"
    with h5py.File(path, "r") as f:
        # the expert solved 3 of 4 Panda starts (seeds 0-3) when measured, seed 0 among them
        assert any(bool(f[f"data/demo_{k}"].attrs["success"]) for k in range(2))
        assert f["data/demo_0/obs/agentview_image"].shape[1:] == (16, 16, 3)


@pytest.mark.slow
def test_two_embodiments_train_together_in_one_batch(mixture_run, tiny_data, iiwa_data):
    meta = json.loads((mixture_run / "dynamics.json").read_text())["config"]
    embodiments = meta["hma"]["embodiments"]
    assert embodiments["panda_osc_pose"]["action_dim"] == 7
    assert embodiments["iiwa_osc_position"]["action_dim"] == 4
    assert embodiments["iiwa_osc_position"]["state_dim"] == 3 + 4 + 6
    assert [d["embodiment"] for d in meta["datasets"]] == ["panda_osc_pose", "iiwa_osc_position"]
    # every embodiment keeps its own statistics
    norm = load_file(mixture_run / "normalization.safetensors")
    assert set(norm) == {f"{e}/{k}" for e in embodiments for k in STAT_KEYS}
    assert norm["iiwa_osc_position/action_mean"].shape == (4,)
    log = read_log(mixture_run)
    start = next(r for r in log if r["event"] == "start")
    assert start["config"]["sampling_probs"] == {str(tiny_data): 0.5, str(iiwa_data): 0.5}
    train = [r for r in log if r["event"] == "train"]
    assert np.mean([r["loss"] for r in train[-2:]]) < np.mean([r["loss"] for r in train[:2]])


@pytest.mark.slow
def test_mixed_batch_pads_and_labels_rows(tiny_data, iiwa_data, tokenizer_run):
    from hma_gym.world_model import load_tokenizer
    from training.fidelity import tokenize_episodes

    tok = load_tokenizer(tokenizer_run)
    sources = []
    for path, emb in ((tiny_data, "panda"), (iiwa_data, "iiwa")):
        eps = load_episodes(DataConfig(data=str(path), image_size=16), "train")
        tokenize_episodes(tok, eps)
        sources.append(Source(str(path), emb, 1, eps, []))
    norms = {s.embodiment: Normalizer.fit(s.train) for s in sources}
    rng = np.random.default_rng(0)
    batch = mixed_batch(sources, np.array([0.5, 0.5]), rng, 32, 6, norms, {"iiwa": 0, "panda": 1}, (7, 13))
    assert batch["actions"].shape == (32, 6, 7) and batch["states"].shape == (32, 6, 13)
    ids = batch["embodiment_ids"]
    assert set(ids.tolist()) == {0, 1}
    # the IIWA rows are zero beyond their 4 action and 13 state dims; the Panda rows beyond 9 state dims
    assert torch.all(batch["actions"][ids == 0][..., 4:] == 0)
    assert torch.all(batch["states"][ids == 1][..., 9:] == 0)
    assert batch["actions"][ids == 1][..., 4:].abs().sum() > 0


def test_sampling_weights_favour_small_datasets_per_window():
    p = sampling_weights([100, 400], 0.5)
    np.testing.assert_allclose(p, [1 / 3, 2 / 3])
    np.testing.assert_allclose(sampling_weights([100, 400], 1.0), [0.2, 0.8])
    np.testing.assert_allclose(sampling_weights([100, 400], 0.0), [0.5, 0.5])
    assert p[0] / 100 > p[1] / 400  # a window of the small dataset is drawn more often than one of the large
    with pytest.raises(ValueError, match="training windows"):
        sampling_weights([0, 10], 0.5)


def test_bad_mixture_files_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_mixture(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"datasets": [{"data": "a.hdf5", "stride": 2}]}))
    with pytest.raises(DatasetError, match=r"datasets\[0\] has unknown keys \['stride'\]"):
        read_mixture(str(bad))
    bad.write_text(json.dumps({"datasets": []}))
    with pytest.raises(DatasetError, match="non-empty"):
        read_mixture(str(bad))


@pytest.mark.slow
def test_new_embodiment_attaches_to_a_trained_trunk(dynamics_run, iiwa_data, tokenizer_run, tmp_path):
    """--init a Panda-only model, --trainable new-embodiments on IIWA data: only the new stem and head move."""
    out = tmp_path / "ft"
    main(["train", "--data", str(iiwa_data), "--embodiment", "iiwa_osc_position", "--init", str(dynamics_run),
          "--trainable", "new-embodiments", "--tokenizer", str(tokenizer_run), "--out", str(out), "--steps", "6",
          "--eval-every", "6", "--save-every", "6", *DYN_ARGS])
    before = load_file(dynamics_run / "dynamics.safetensors")
    after = load_file(out / "dynamics.safetensors")
    new = {k for k in after if k.startswith("embodiments.iiwa_osc_position.")}
    assert new and not new & set(before)
    assert set(after) - new == set(before)
    for key in before:  # trunk and the Panda stem/head are frozen
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    meta = json.loads((out / "dynamics.json").read_text())["config"]
    assert meta["init"]["new_embodiments"] == ["iiwa_osc_position"]
    norm = load_file(out / "normalization.safetensors")
    assert set(norm) == {f"{e}/{k}" for e in ("panda_osc_pose", "iiwa_osc_position") for k in STAT_KEYS}
    torch.testing.assert_close(norm["panda_osc_pose/action_mean"],
                               load_file(dynamics_run / "normalization.safetensors")["panda_osc_pose/action_mean"])
    # then a full fine-tune from it trains the trunk too
    out2 = tmp_path / "ft2"
    main(["train", "--data", str(iiwa_data), "--embodiment", "iiwa_osc_position", "--init", str(out),
          "--tokenizer", str(tokenizer_run), "--out", str(out2), "--steps", "4", "--eval-every", "4",
          "--save-every", "4", *DYN_ARGS])
    after2 = load_file(out2 / "dynamics.safetensors")
    assert any(not torch.equal(after2[k], after[k]) for k in before)


@pytest.mark.slow
def test_init_refuses_mismatched_dims_and_new_embodiments_without_any(dynamics_run, iiwa_data, tiny_data,
                                                                      tokenizer_run, tmp_path):
    from hma_gym.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="panda_osc_pose"):
        main(["train", "--data", str(iiwa_data), "--embodiment", "panda_osc_pose", "--init", str(dynamics_run),
              "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "x"), "--steps", "2", *DYN_ARGS])
    with pytest.raises(SystemExit):
        main(["train", "--data", str(iiwa_data), "--trainable", "new-embodiments", "--tokenizer", str(tokenizer_run),
              "--out", str(tmp_path / "y"), "--steps", "2", *DYN_ARGS])
    with pytest.raises(CheckpointError, match="already has every embodiment of the data"):
        main(["train", "--data", str(tiny_data), "--init", str(dynamics_run), "--trainable", "new-embodiments",
              "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "z"), "--steps", "2", *DYN_ARGS])
