"""Issue 28, data and training: files the trainers cannot use are refused in one line, training that goes
non-finite stops without saving, and the HDF5 writer survives readers."""

import logging
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from hma_gym.cli import main
from hma_gym.data.hdf5 import DatasetError, RobomimicWriter, list_demos, validate_file
from tests.test_diffusion_policy import TRAIN_ARGS
from training.loop import LoopConfig, NonFiniteError, train_loop

N = 5  # steps per demo
PROPRIO = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def _good_file(path: Path, demos: int = 2, size: int = 16) -> Path:
    """A valid file with MuJoCo-like states, the default image key and proprio keys."""
    writer = RobomimicWriter(path, {"env_name": "Lift", "type": 1, "env_kwargs": {}}, valid_every=2)
    for d in range(demos):
        rng = np.random.default_rng(d)
        ep = writer.new_episode(model_file="<mujoco/>")
        for t in range(N):
            obs = {"agentview_image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
                   **{k: rng.normal(size=n).astype(np.float32) for k, n in PROPRIO.items()}}
            ep.add_step(obs, rng.uniform(-1, 1, 7), float(t == N - 1), t == N - 1, obs, state=rng.normal(size=6))
        writer.write_episode(ep)
    return path


def _replace(f: h5py.File, key: str, value) -> None:
    del f[key]
    f[key] = value


def _set(f: h5py.File, key: str, index, value) -> None:
    arr = f[key][()]
    arr[index] = value
    _replace(f, key, arr)


def _group(f: h5py.File, key: str) -> None:
    del f[key]
    f.create_group(key).create_dataset("x", data=np.zeros((N, 3), np.float32))


def _drop_image(f: h5py.File) -> None:
    for demo in ("demo_0", "demo_1"):
        for grp in ("obs", "next_obs"):
            del f[f"data/{demo}/{grp}/agentview_image"]


IMG = "data/demo_0/obs/agentview_image"
BROKEN = {
    # name: (change to a valid file, validate_file kwargs, what the message must say)
    "float_images": (lambda f: _replace(f, IMG, f[IMG][()].astype(np.float32) / 255), {},
                     r"demo_0/obs/agentview_image: float32 \(5, 16, 16, 3\); expected uint8 images \(5, H, W, 3\)"),
    "int64_images": (lambda f: _replace(f, IMG, f[IMG][()].astype(np.int64)), {},
                     r"demo_0/obs/agentview_image: int64 \(5, 16, 16, 3\); expected uint8 images"),
    "chw_images": (lambda f: _replace(f, IMG, np.moveaxis(f[IMG][()], -1, 1)), {},
                   r"demo_0/obs/agentview_image: uint8 \(5, 3, 16, 16\); expected uint8 images \(5, H, W, 3\), "
                   r"channels last"),
    "nan_obs": (lambda f: _set(f, "data/demo_1/obs/robot0_eef_pos", (2, 0), np.nan), {},
                r"demo_1/obs/robot0_eef_pos: 1 non-finite values \(NaN/inf\), the first in row 2"),
    "inf_next_obs": (lambda f: _set(f, "data/demo_0/next_obs/robot0_gripper_qpos", 4, np.inf), {},
                     r"demo_0/next_obs/robot0_gripper_qpos: 2 non-finite values \(NaN/inf\), the first in row 4"),
    "nan_actions": (lambda f: _set(f, "data/demo_0/actions", (1, 3), np.nan), {},
                    r"demo_0/actions: 1 non-finite values \(NaN/inf\), the first in row 1"),
    "1d_actions": (lambda f: _replace(f, "data/demo_0/actions", f["data/demo_0/actions"][:, 0]), {},
                   r"demo_0/actions: float32 \(5,\); expected \(5, action_dim\)"),
    "3d_actions": (lambda f: _replace(f, "data/demo_0/actions", f["data/demo_0/actions"][()][..., None]), {},
                   r"demo_0/actions: float32 \(5, 7, 1\); expected \(5, action_dim\)"),
    "scalar_actions": (lambda f: _replace(f, "data/demo_1/actions", np.float32(0.5)), {},
                       r"demo_1/actions: float32 \(\); expected \(5, action_dim\)"),
    "int_actions": (lambda f: _replace(f, "data/demo_0/actions", np.zeros((N, 7), np.int64)), {},
                    r"demo_0/actions: int64 \(5, 7\); expected floats"),
    "other_action_width": (lambda f: _replace(f, "data/demo_1/actions", np.zeros((N, 4), np.float32)), {},
                           r"demo_1/actions: float32 \(rows, 4\); other demos have float32 \(rows, 7\)"),
    "other_obs_width": (lambda f: _replace(f, "data/demo_1/obs/robot0_eef_pos", np.zeros((N, 4), np.float32)), {},
                        r"demo_1/obs/robot0_eef_pos: float32 \(rows, 4\); other demos have float32 \(rows, 3\)"),
    "obs_key_is_group": (lambda f: _group(f, "data/demo_0/obs/robot0_eef_pos"), {},
                         r"demo_0/obs/robot0_eef_pos is a group; expected a dataset of 5 rows"),
    "obs_is_dataset": (lambda f: _replace(f, "data/demo_0/next_obs", np.zeros(3)), {},
                       r"demo_0/next_obs is a dataset; expected a group of observation keys"),
    "scalar_rewards": (lambda f: _replace(f, "data/demo_0/rewards", np.float64(1)), {},
                       r"demo_0/rewards: float64 \(\); expected \(5,\)"),
    "demo_is_dataset": (lambda f: _replace(f, "data/demo_1", np.zeros(3)), {},
                        r"data/demo_1 is a dataset; expected a demo group"),
    "no_image_key": (_drop_image, {"image_key": "agentview_image"},
                     r"demo_0/obs: no observation 'agentview_image' \(its keys: \['robot0_eef_pos', "),
    "no_proprio_key": (lambda f: None, {"obs_keys": ["robot0_joint_pos"]},
                       r"demo_0/next_obs: no observation 'robot0_joint_pos'"),
}


def _broken(tmp_path: Path, name: str) -> Path:
    path = _good_file(tmp_path / f"{name}.hdf5")
    with h5py.File(path, "a") as f:
        BROKEN[name][0](f)
    return path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_validate_file_refuses_what_trainers_cannot_use(tmp_path, name):
    path = _broken(tmp_path, name)
    with pytest.raises(DatasetError, match=BROKEN[name][2]) as err:
        validate_file(path, **BROKEN[name][1])
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))


def test_validate_file_accepts_good_files_and_lists_problems_on_one_line(tmp_path):
    path = _good_file(tmp_path / "good.hdf5")
    info = validate_file(path, image_key="agentview_image", obs_keys=list(PROPRIO))
    assert info["demos"] == 2 and info["obs_keys"] == sorted(["agentview_image", *PROPRIO])
    with h5py.File(path, "a") as f:  # every demo broken twice: the message lists 8 problems and counts the rest
        for d in range(2):
            for grp in ("obs", "next_obs"):
                for key in PROPRIO:
                    _set(f, f"data/demo_{d}/{grp}/{key}", 0, np.nan)
    with pytest.raises(DatasetError, match=r"; \.\.\. and 4 more$") as err:
        validate_file(path)
    assert "\n" not in str(err.value)


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI as the console script does (no argv: errors become one line and exit code 1)."""
    monkeypatch.setattr(sys, "argv", ["hma-gym", *argv])
    code = main()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["chw_images", "nan_obs"])
def test_train_policy_refuses_broken_file_in_one_line(tmp_path, monkeypatch, capsys, name):
    """Before: a NaN robot0_eef_pos trained an all-NaN policy and exited 0; CHW images crashed in a reshape."""
    path, out = _broken(tmp_path, name), tmp_path / "dp"
    code, err = _cli(monkeypatch, capsys, "train-policy", "--data", str(path), "--out", str(out), "--steps", "2",
                     *TRAIN_ARGS)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"hma-gym train-policy: error: {path}: ")
    assert (BROKEN[name][2].split(":")[0]) in err
    assert not (out / "policy.safetensors").exists()


@pytest.mark.slow
def test_console_script_exits_nonzero_with_one_line(tmp_path):
    """The real process: exit status 1, one line on stderr, no traceback."""
    path = _broken(tmp_path, "scalar_actions")
    proc = subprocess.run([sys.executable, "-m", "hma_gym.cli", "train-detector", "--data", str(path), "--out",
                           str(tmp_path / "det"), "--steps", "2", "--no-progress"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "demo_1/actions: float32 (); expected (5, action_dim)" in proc.stderr


def test_other_trainers_and_synthesize_validate_first(tmp_path, monkeypatch, capsys):
    nan = _broken(tmp_path, "nan_obs")
    code, err = _cli(monkeypatch, capsys, "train-tokenizer", "--data", str(nan), "--out", str(tmp_path / "tok"),
                     "--preset", "tiny", "--image-size", "16", "--steps", "2", "--no-progress")
    assert code == 1 and "robot0_eef_pos: 1 non-finite values" in err and err.count("\n") == 1
    assert not (tmp_path / "tok" / "tokenizer.safetensors").exists()
    code, err = _cli(monkeypatch, capsys, "synthesize", "--out", str(tmp_path / "syn.hdf5"), "--actions",
                     str(_broken(tmp_path, "obs_key_is_group")), "--no-progress")
    assert code == 1 and "demo_0/obs/robot0_eef_pos is a group" in err
    assert not (tmp_path / "syn.hdf5").exists()
    code, err = _cli(monkeypatch, capsys, "train-policy", "--data", str(tmp_path / "missing.hdf5"),
                     "--out", str(tmp_path / "dp"))
    assert code == 1 and err == f"hma-gym train-policy: error: {tmp_path / 'missing.hdf5'}: file does not exist\n"


def test_cli_turns_oserror_into_one_line(monkeypatch, capsys):
    import training.train_policy

    def unreadable(cfg):
        raise PermissionError(13, "Permission denied", cfg.data)

    monkeypatch.setattr(training.train_policy, "train_policy", unreadable)
    code, err = _cli(monkeypatch, capsys, "train-policy", "--data", "/root/secret.hdf5")
    assert (code, err) == (1, "hma-gym train-policy: error: [Errno 13] Permission denied: '/root/secret.hdf5'\n")


# ----------------------------------------------------------------------------- non-finite training


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x).pow(2).mean()


def _toy_loop(tmp_path, loss_fn, on_step=None, steps=6, save_every=2):
    exported: list[int] = []
    cfg = LoopConfig(out=str(tmp_path / "run"), steps=steps, batch_size=2, warmup=0, save_every=save_every,
                     log_every=1, eval_every=100, progress=False, device="cpu")

    def export_fn(m, step):
        assert all(torch.isfinite(p).all() for p in m.parameters())
        exported.append(step)

    with pytest.raises(NonFiniteError) as err:
        train_loop(cfg, _Toy(), lambda step, rng: {"x": torch.ones(2, 3), "step": step}, loss_fn, None, export_fn,
                   {}, desc="toy", on_step=on_step)
    return str(err.value), exported


def test_loop_stops_on_nonfinite_loss_naming_step_and_term(tmp_path):
    def loss_fn(net, batch):
        bad = torch.tensor(float("nan") if batch["step"] == 2 else 0.0)
        loss = net(batch["x"]) + bad
        return loss, {"loss": loss, "recon": net(batch["x"]), "state_term": bad}

    message, exported = _toy_loop(tmp_path, loss_fn)
    assert message.startswith("toy: non-finite loss nan at step 3 (non-finite terms: state_term)")
    assert exported == [2]  # the save at step 2; nothing after the NaN


def test_loop_stops_on_nonfinite_gradient(tmp_path):
    def loss_fn(net, batch):
        loss = net(batch["x"])
        if batch["step"] == 1:  # sqrt at 0: a finite loss with an infinite gradient
            w2 = net.lin.weight.pow(2).sum()
            loss = loss + (w2 - w2.detach()).sqrt()
        return loss, {"loss": loss}

    message, exported = _toy_loop(tmp_path, loss_fn)
    assert message.startswith("toy: non-finite gradient norm (inf) at step 2") and exported == []


def test_loop_never_saves_nonfinite_weights(tmp_path):
    def poison(m, step):  # a finite loss can still leave non-finite weights (e.g. an optimizer overflow)
        if step == 3:
            with torch.no_grad():
                m.lin.bias.fill_(float("inf"))

    def loss_fn(net, batch):  # the weight only: the poisoned bias does not reach the loss
        loss = net.lin.weight.pow(2).sum()
        return loss, {"loss": loss}

    message, exported = _toy_loop(tmp_path, loss_fn, on_step=poison, steps=4)
    assert message == "toy at step 4: lin.bias holds 1 of 1 non-finite values; not saved"
    assert exported == [2]
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 2  # the last good save is kept


def test_train_policy_stops_when_training_diverges(tmp_path, monkeypatch, capsys):
    """A valid file, a learning rate that blows the weights up: a clear error, no NaN policy on disk."""
    path, out = _good_file(tmp_path / "ok.hdf5", demos=4), tmp_path / "dp"
    args = list(TRAIN_ARGS)
    args[args.index("--lr") + 1] = "1e30"
    code, err = _cli(monkeypatch, capsys, "train-policy", "--data", str(path), "--out", str(out), "--steps", "20",
                     "--save-every", "1", *args)
    assert code == 1 and err.startswith("hma-gym train-policy: error: policy") and err.count("\n") == 1
    assert "non-finite" in err and "at step" in err
    if (out / "policy.safetensors").exists():
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(out / "policy.safetensors").values())


# ----------------------------------------------------------------------------- writer beside readers

HOLD = """import sys, time
import h5py
if sys.argv[2] == "project":
    from hma_gym.data.hdf5 import open_for_reading as open_file
else:
    open_file = h5py.File
f = open_file(sys.argv[1])
print("open", flush=True)
time.sleep(float(sys.argv[3]))
f.close()
"""


def _write_beside_reader(tmp_path, reader: str, hold_s: float, caplog) -> tuple[Path, float]:
    path = _good_file(tmp_path / "held.hdf5", demos=1)
    writer = RobomimicWriter(path, {"env_name": "Lift", "type": 1, "env_kwargs": {}}, valid_every=2)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), reader, str(hold_s)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "open\n"
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hma_gym.data.hdf5"):
            for d in range(3):
                ep = writer.new_episode(model_file="<mujoco/>")
                for t in range(N):
                    obs = {"agentview_image": np.zeros((16, 16, 3), np.uint8),
                           **{k: np.full(n, d, np.float32) for k, n in PROPRIO.items()}}
                    ep.add_step(obs, np.zeros(7), 0.0, t == N - 1, obs, state=np.zeros(6))
                writer.write_episode(ep)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    return path, elapsed


@pytest.mark.slow
def test_writer_waits_for_a_plain_h5py_reader(tmp_path, caplog):
    """Before: BlockingIOError (unable to lock file) and the finished episode was lost."""
    path, elapsed = _write_beside_reader(tmp_path, "plain", 1.5, caplog)
    assert elapsed > 0.5  # it waited for the reader to close the file
    assert any("another process has it open" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)
    assert validate_file(path)["demos"] == 4 and list_demos(path) == [f"demo_{i}" for i in range(4)]


def test_project_readers_do_not_block_the_writer(tmp_path, caplog):
    path, elapsed = _write_beside_reader(tmp_path, "project", 30, caplog)
    assert not [r for r in caplog.records if "another process" in r.getMessage()]
    assert elapsed < 10 and validate_file(path)["demos"] == 4


def test_project_readers_work_while_this_process_holds_the_file(tmp_path):
    """HDF5 refuses a lock-free opening of a file this process already holds with the lock; readers share it."""
    path = _good_file(tmp_path / "open.hdf5")
    with h5py.File(path, "r"):
        assert validate_file(path)["demos"] == 2 and list_demos(path, "train") == ["demo_0"]
