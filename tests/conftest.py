import json
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402

import hma_gym  # noqa: E402,F401  (registers the env ids)
from hma_gym.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def lift_env():
    env = gym.make("RobomimicLift-v0")
    yield env
    env.close()


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- a tiny real pipeline, built once per session
# collect (16x16 Lift) -> train-tokenizer -> train -> train-detector -> pack: every CLI step for real, tiny.

DYN_ARGS = ["--preset", "tiny", "--patch-size", "2", "--max-frames", "6", "--prompt-frames", "1", "2",
            "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--log-every", "2", "--eval-windows", "2",
            "--threads", "1", "--no-progress"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 real Lift episodes at 16x16 (every 4th demo held out)."""
    path = tmp_path_factory.mktemp("data") / "lift16.hdf5"
    main(["collect", "--out", str(path), "--episodes", "8", "--image-size", "16", "--no-progress",
          "--valid-every", "4", "--steps-after-success", "3"])
    return path


@pytest.fixture(scope="session")
def tokenizer_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tokenizer"
    main(["train-tokenizer", "--data", str(tiny_data), "--out", str(out), "--preset", "tiny", "--image-size", "16",
          "--steps", "60", "--batch-size", "16", "--lr", "3e-3", "--warmup", "5", "--eval-every", "30",
          "--save-every", "30", "--log-every", "5", "--eval-frames", "64", "--threads", "1", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def dynamics_run(tiny_data, tokenizer_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "dynamics"
    main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(out), "--steps", "40",
          "--eval-every", "40", "--save-every", "20", *DYN_ARGS])
    return out


@pytest.fixture(scope="session")
def detector_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "detector"
    main(["train-detector", "--data", str(tiny_data), "--out", str(out), "--image-size", "16", "--steps", "30",
          "--batch-size", "16", "--eval-every", "30", "--save-every", "30", "--log-every", "10", "--warmup", "3",
          "--channels", "8", "16", "16", "--hidden", "32", "--threads", "1", "--no-progress"])
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tokenizer_run, dynamics_run, detector_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "lift16"
    main(["pack", "--out", str(out), "--tokenizer", str(tokenizer_run), "--dynamics", str(dynamics_run),
          "--detector", str(detector_run), "--data", str(tiny_data), "--bank-size", "5"])
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core machine OpenMP spinning makes them far slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PIPELINE_FIXTURES = {"tiny_data", "tokenizer_run", "dynamics_run", "detector_run", "tiny_checkpoint"}


def pytest_collection_modifyitems(config, items):
    """Tests that build or use the tiny pipeline above are slow (minutes the first time): mark them so, so the
    fast tier (`pytest -m "not slow"`) stays fast without each test having to remember."""
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
