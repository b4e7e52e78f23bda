"""Success detector: training lowers the loss, export/load round trip, exact resume, clear errors."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hma_gym.checkpoint import CheckpointError
from hma_gym.data.hdf5 import RobomimicWriter
from hma_gym.models.detector import DetectorConfig, SuccessDetector, load_detector
from training.data import DataConfig, Normalizer, load_episodes
from training.train_detector import DetectorTrainConfig, FrameSet, train_detector

SIZE = 16
ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {}}


def _frame(t: int, success: bool, rng) -> dict:
    """A noisy grey frame; success frames have a bright square high in the image, like a lifted cube."""
    image = rng.integers(40, 90, (SIZE, SIZE, 3), dtype=np.uint8)
    row = 2 if success else 11
    image[row : row + 3, 6:9] = (230, 40, 40)
    z = 1.0 if success else 0.8
    return {
        "agentview_image": image,
        "robot0_eef_pos": np.array([0.0, 0.0, z + 0.01 * rng.normal()], np.float32),
        "robot0_eef_quat": np.array([0, 1, 0, 0], np.float32),
        "robot0_gripper_qpos": rng.normal(0, 0.01, 2).astype(np.float32),
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "lift.hdf5"
    writer = RobomimicWriter(path, ENV_ARGS, valid_every=3)
    for e in range(6):
        rng = np.random.default_rng(e)
        n, first = 12, 7 if e % 2 == 0 else 99  # odd episodes never succeed
        frames = [_frame(t, t >= first, rng) for t in range(n + 1)]
        ep = writer.new_episode(model_file="<mujoco/>")
        for t in range(n):
            ep.add_step(frames[t], rng.uniform(-1, 1, 7), float(t + 1 >= first), t == n - 1, frames[t + 1],
                        state=rng.normal(size=10))
        writer.write_episode(ep, success=first < n)
    return path


def _cfg(data_file, out, **kw) -> DetectorTrainConfig:
    base = DetectorTrainConfig(
        data=str(data_file), image_size=SIZE, out=str(out), channels=(8, 16), hidden=32, state_hidden=16,
        batch_size=16, steps=30, warmup=0, min_lr_ratio=1.0, lr=3e-3, log_every=1, eval_every=1000,
        save_every=1000, threads=1, progress=False, device="cpu",
    )
    return replace(base, **kw)


def _train_losses(out) -> list[float]:
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_training_lowers_loss_and_round_trips(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train_detector(_cfg(data_file, out))
    losses = _train_losses(out)
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert metrics["balanced_accuracy"] > 0.9 and metrics["threshold"] == 0.5
    printed = json.loads(capsys.readouterr().out)
    assert printed["recall"] == metrics["recall"] and {"precision", "accuracy", "ms_per_frame_cpu"} <= set(printed)

    model, threshold, norm = load_detector(out)
    assert threshold == 0.5 and not model.training and model.cfg.state_dim == 9
    # the loaded detector reproduces the trained one's probabilities exactly
    data_cfg = DataConfig(data=str(data_file), image_size=SIZE)
    valid = load_episodes(data_cfg, "valid")
    normalizer = Normalizer.fit(load_episodes(data_cfg, "train"))
    frames = FrameSet.from_episodes(valid, normalizer)
    raw = torch.from_numpy(np.concatenate([e.states for e in valid]))
    torch.testing.assert_close((raw - norm["state_mean"]) / norm["state_std"], torch.from_numpy(frames.states))
    p = model.predict_proba(frames.frames, frames.states)
    state = torch.load(out / "train_state.pt", weights_only=True)["model"]
    trained = SuccessDetector(model.cfg)
    trained.load_state_dict(state)
    assert torch.equal(p, trained.predict_proba(torch.from_numpy(frames.frames), frames.states))
    # uint8 HWC and float CHW inputs are the same thing
    as_float = torch.from_numpy(frames.frames).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(model.predict_proba(as_float, frames.states), p)


def test_exact_resume(data_file, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_detector(_cfg(data_file, whole, steps=6, save_every=3))
    train_detector(_cfg(data_file, split, steps=3, save_every=3))
    train_detector(_cfg(data_file, split, steps=6, save_every=3, resume=True))
    a = torch.load(whole / "train_state.pt", weights_only=True)["model"]
    b = torch.load(split / "train_state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="dropout"):
        DetectorConfig(dropout=1.5)
    with pytest.raises(ValueError, match="image_size"):
        DetectorConfig(image_size=60, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="unknown DetectorConfig field"):
        DetectorConfig.from_dict({"widths": [1]})
    with pytest.raises(ValueError, match="aug_blur"):
        DetectorTrainConfig(aug_blur=2.0)
    with pytest.raises(ValueError, match="hidden"):
        DetectorTrainConfig(hidden=0)
    with pytest.raises(ValueError, match="threshold"):
        DetectorTrainConfig(threshold=1.0)


def test_missing_file_is_named(data_file, tmp_path):
    with pytest.raises(CheckpointError, match="detector.json"):
        load_detector(tmp_path)
    out = tmp_path / "run"
    train_detector(_cfg(data_file, out, steps=1))
    (out / "detector_normalization.safetensors").unlink()
    with pytest.raises(CheckpointError, match="detector_normalization.safetensors"):
        load_detector(out)
    (out / "detector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="detector.safetensors"):
        load_detector(out)


def test_small_and_shape_errors():
    model = SuccessDetector(DetectorConfig())
    assert model.num_params() < 500_000
    images = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    assert model(images, torch.zeros(2, 9)).shape == (2,)
    with pytest.raises(ValueError, match="states"):
        model(images, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="uint8 images"):
        model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, 9))
