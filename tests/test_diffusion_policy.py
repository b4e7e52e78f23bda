"""Diffusion Policy: config checks, robomimic windows, training smoke run + exact resume, batched acting, save/load."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hma_gym.checkpoint import CheckpointError
from hma_gym.cli import main
from hma_gym.data.hdf5 import RobomimicWriter, list_demos, read_demo
from policies.diffusion import DiffusionPolicyConfig, load_diffusion_policy

SIZE = 16
TINY = dict(image_size=SIZE, crop_size=14, horizon=8, n_action_steps=4, encoder_channels=(8, 16), num_keypoints=4,
            image_feature_dim=16, down_dims=(16, 32), kernel_size=3, n_groups=4, diffusion_step_embed_dim=16,
            num_inference_steps=4)
TRAIN_ARGS = ["--crop-size", "14", "--horizon", "8", "--n-action-steps", "4", "--encoder-channels", "8", "16",
              "--num-keypoints", "4", "--image-feature-dim", "16", "--down-dims", "16", "32", "--kernel-size", "3",
              "--n-groups", "4", "--diffusion-step-embed-dim", "16", "--num-inference-steps", "4",
              "--batch-size", "32", "--lr", "3e-3", "--warmup", "2", "--min-lr-ratio", "1",
              "--log-every", "1", "--eval-samples", "8",
              "--threads", "1", "--no-progress"]


def _obs(rng, n=None):
    lead = () if n is None else (n,)
    return {"agentview_image": rng.integers(0, 255, (*lead, SIZE, SIZE, 3), dtype=np.uint8),
            "robot0_eef_pos": rng.normal(size=(*lead, 3)).astype(np.float32),
            "robot0_eef_quat": rng.normal(size=(*lead, 4)).astype(np.float32),
            "robot0_gripper_qpos": rng.normal(size=(*lead, 2)).astype(np.float32)}


def _write_demos(path: Path, episodes: int, first_seed: int = 0, size: int = SIZE, shift: float = 0.0) -> Path:
    """Demos without MuJoCo `states` (as the learned simulator writes them); smooth actions."""
    writer = RobomimicWriter(path, {"env_name": "Lift", "type": 1, "env_kwargs": {}, "synthetic": True},
                             valid_every=4)
    for e in range(first_seed, first_seed + episodes):
        rng = np.random.default_rng(e)
        ep = writer.new_episode()
        n = 12 + e % 8
        for t in range(n):
            obs = _obs(rng)
            if size != SIZE:
                obs["agentview_image"] = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            action = np.clip(np.sin(0.3 * t + np.arange(7) + e), -1, 1) + shift
            ep.add_step(obs, action, float(t == n - 1), t == n - 1, obs)
        writer.write_episode(ep)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 synthetic demos."""
    return _write_demos(tmp_path_factory.mktemp("dp") / "synthetic.hdf5", 8)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp_runs") / "dp"
    main(["train-policy", "--data", str(data), "--out", str(out), "--steps", "40", "--save-every", "20",
          "--eval-every", "20", "--save-at", "10", "--max-demos", "5", *TRAIN_ARGS])
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_config_errors_name_the_field(data, tmp_path, capsys):
    with pytest.raises(ValueError, match="n_action_steps"):
        DiffusionPolicyConfig(horizon=16, n_obs_steps=2, n_action_steps=16)
    with pytest.raises(ValueError, match="horizon"):
        DiffusionPolicyConfig(horizon=10, down_dims=(64, 128, 256))
    with pytest.raises(ValueError, match="crop_size"):
        DiffusionPolicyConfig(image_size=32, crop_size=40)
    with pytest.raises(ValueError, match="sampler"):
        DiffusionPolicyConfig(sampler="euler")
    with pytest.raises(ValueError, match="unknown"):
        DiffusionPolicyConfig.from_dict({"horizon": 16, "bogus": 1})
    from training.train_policy import PolicyTrainConfig

    with pytest.raises(ValueError, match="max_demos"):
        PolicyTrainConfig(max_demos=-1)
    with pytest.raises(ValueError, match="save_at"):
        PolicyTrainConfig(steps=10, save_at=(20,))
    with pytest.raises(SystemExit):
        main(["train-policy", "--data", str(data), "--out", str(tmp_path / "x"), "--n-action-steps", "99"])
    assert "n_action_steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="crop_size"):  # only the file knows its image size
        main(["train-policy", "--data", str(data), "--out", str(tmp_path / "y"), *TRAIN_ARGS, "--crop-size", "20"])


def test_robomimic_windows_without_states(data):
    from training.train_policy import PolicyTrainConfig, open_windows, split_window

    cfg = PolicyTrainConfig(data=str(data), **{k: v for k, v in TINY.items() if k != "image_size"})
    ds = open_windows(data, cfg, "train", max_demos=3)
    assert ds.demos == list_demos(data, "train")[:3] and ds.n_demos == 3
    images, proprio, actions = split_window(ds[0], cfg)
    assert images.dtype == np.uint8 and images.shape == (2, SIZE, SIZE, 3)
    assert proprio.shape == (2, 9) and actions.shape == (8, 7)
    demo = read_demo(data, ds.demos[0])
    # t = 0: the history repeats the first frame, the chunk starts with the (repeated) first action
    assert (images[0] == images[1]).all() and (images[1] == demo["obs"]["agentview_image"][0]).all()
    np.testing.assert_allclose(actions[0], demo["actions"][0], atol=1e-6)
    np.testing.assert_allclose(actions[1:], demo["actions"][:7], atol=1e-6)
    images, proprio, actions = split_window(ds[5], cfg)  # t = 5: frames 4, 5; actions 4 .. 11
    assert (images == demo["obs"]["agentview_image"][4:6]).all()
    np.testing.assert_allclose(actions, demo["actions"][4:12], atol=1e-6)
    np.testing.assert_allclose(proprio[:, :3], demo["obs"]["robot0_eef_pos"][4:6], atol=1e-6)


def test_training_smoke_loss_falls_and_exports(run):
    log = _log(run)
    start = log[0]
    assert start["event"] == "start" and start["config"]["train_demos"] == 5
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.93 * np.mean(losses[:3])
    evals = [r for r in log if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and all(np.isfinite(r["valid_action_mse"]) for r in evals)
    for d in (run, run / "iter_10"):
        assert (d / "policy.safetensors").is_file() and (d / "policy.json").is_file()
    meta = json.loads((run / "iter_10" / "policy.json").read_text())
    assert meta["info"]["step"] == 10 and meta["config"]["horizon"] == 8
    assert json.loads((run / "policy.json").read_text())["info"]["step"] == 40
    assert json.loads((run / "metrics.json").read_text())["params"] > 0


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(data, run, tmp_path):
    """EMA and save_at included: 20 steps + a resumed 20 give the same exported weights as 40 at once."""
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    args = ["train-policy", "--data", str(data), "--out", str(out), "--save-every", "20", "--eval-every", "20",
            "--save-at", "10", "--max-demos", "5", *TRAIN_ARGS]
    main([*args, "--steps", "20"])
    main([*args, "--steps", "40"])  # resumes from out/train_state.pt (constant lr: --steps does not move it)
    assert any(r["event"] == "resume" and r["step"] == 20 for r in _log(out))
    for name in ("policy.safetensors", "iter_10/policy.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_mixed_real_and_extra_files(data, tmp_path):
    """--extra-data: demos of more files join the training set (the synthetic-data study's mixes); the
    normaliser is fitted on every file's rows; files of another image size are refused."""
    from safetensors.torch import load_file

    extra = _write_demos(tmp_path / "extra.hdf5", 6, first_seed=100, shift=2.0)  # actions beyond the file's
    extra_rows = sum(len(read_demo(extra, n)["actions"]) for n in list_demos(extra)[:4])
    out = tmp_path / "mixed"
    main(["train-policy", "--data", str(data), "--out", str(out), "--steps", "6", "--max-demos", "3",
          "--extra-data", str(extra), "--extra-max-demos", "4", *TRAIN_ARGS])
    meta = json.loads((out / "policy.json").read_text())["info"]
    assert meta["train_demos"] == 7 and meta["extra_demos"] == [4] and meta["extra_data"] == [str(extra)]
    own_rows = sum(len(read_demo(data, n)["actions"]) for n in list_demos(data, "train")[:3])
    assert meta["train_windows"] == own_rows + extra_rows  # one window per time step
    # the extra demos' actions reach the fitted normaliser: its range covers their (shifted) extremes
    high = load_file(str(out / "policy.safetensors"))["normalizer.action.high"].numpy()
    extra_max = np.max([read_demo(extra, n)["actions"].max(0) for n in list_demos(extra)[:4]], 0)
    assert (extra_max > 1.5).all() and np.allclose(high, extra_max, atol=1e-5)
    log = _log(out)
    assert all(np.isfinite(r["loss"]) for r in log if r["event"] == "train")

    with pytest.raises(Exception, match="differ in shape"):
        main(["train-policy", "--data", str(data), "--out", str(tmp_path / "bad"), "--steps", "2",
              "--extra-data", str(_write_demos(tmp_path / "big.hdf5", 2, size=20)), *TRAIN_ARGS])
    with pytest.raises(Exception, match="no demos under mask/nope"):
        main(["train-policy", "--data", str(data), "--out", str(tmp_path / "bad2"), "--steps", "2",
              "--extra-data", str(extra), "--extra-filter-key", "nope", *TRAIN_ARGS])


def test_save_load_round_trip_same_actions(run, tmp_path):
    obs_seq = [_obs(np.random.default_rng(i), n=2) for i in range(6)]
    a = load_diffusion_policy(run, seed=3)
    b = load_diffusion_policy(str(run), seed=3)
    acts_a = [a.act(o) for o in obs_seq]
    assert all(np.array_equal(x, y) for x, y in zip(acts_a, [b.act(o) for o in obs_seq], strict=True))
    a.save(tmp_path / "copy")
    c = type(a).load(tmp_path / "copy", seed=3)
    assert all(np.array_equal(x, c.act(o)) for x, o in zip(acts_a, obs_seq, strict=True))
    other = load_diffusion_policy(run, seed=4)
    assert not np.array_equal(acts_a[0], other.act(obs_seq[0]))
    # the fitted normaliser travels in the weights
    assert torch.equal(a.model.normalizer.action.scale, c.model.normalizer.action.scale)
    assert not torch.equal(a.model.normalizer.action.scale, torch.ones(7))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_act_batched_queues_and_reset(sampler):
    from policies.diffusion import DiffusionPolicy

    torch.manual_seed(0)
    policy = DiffusionPolicy(DiffusionPolicyConfig(**TINY, sampler=sampler), seed=0)
    calls = []
    sample = policy.model.sample
    policy.model.sample = lambda images, prop, **kw: calls.append(len(images)) or sample(images, prop, **kw)
    rng = np.random.default_rng(0)
    first = _obs(rng, n=3)
    actions = policy.act(first)
    assert actions.shape == (3, 7) and actions.dtype == np.float32 and np.abs(actions).max() <= 1.0
    assert (policy._images[:, 0] == first["agentview_image"]).all()  # history starts as the first frame, twice
    assert (policy._images[:, 1] == first["agentview_image"]).all()
    for _ in range(5):
        policy.act(_obs(rng, n=3))
    assert calls == [3, 3]  # re-planned at calls 0 and n_action_steps=4, for all three envs at once
    policy.reset([1])
    new = _obs(rng, n=3)
    policy.act(new)
    assert calls == [3, 3, 1]  # only env 1 re-plans
    assert (policy._images[1] == new["agentview_image"][1]).all()  # env 1: a fresh history
    assert not (policy._images[0, 0] == policy._images[0, 1]).all()  # env 0 keeps its history
    for _ in range(2):
        policy.act(_obs(rng, n=3))
    assert calls == [3, 3, 1, 2]  # envs 0 and 2 re-plan together; env 1 still has a queue
    with pytest.raises(ValueError, match="robot0_eef_quat"):
        policy.act({k: v for k, v in new.items() if k != "robot0_eef_quat"})
    with pytest.raises(ValueError, match="agentview_image"):
        policy.act({**new, "agentview_image": new["agentview_image"][:, :8]})


def test_missing_or_corrupt_checkpoint_names_the_file(run, tmp_path, monkeypatch):
    import shutil

    import policies.diffusion as dp
    from policies.diffusion import DiffusionPolicy

    with pytest.raises(CheckpointError, match="nope"):
        DiffusionPolicy.load(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(run / "iter_10", broken)
    (broken / "policy.safetensors").unlink()
    with pytest.raises(CheckpointError, match="policy.safetensors"):
        DiffusionPolicy.load(broken)
    (broken / "policy.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="policy.safetensors"):
        DiffusionPolicy.load(broken)
    (broken / "policy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="policy.json"):
        DiffusionPolicy.load(broken)
    monkeypatch.setitem(dp.SHIPPED_POLICIES, "dp-lift", tmp_path / "assets" / "dp_lift")
    with pytest.raises(CheckpointError, match="shipped policy dp-lift not found at"):
        load_diffusion_policy("dp-lift")


def test_import_is_light():
    code = ("import sys, policies, policies.diffusion; "
            "assert 'diffusers' not in sys.modules and 'policies.diffusion.model' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
