"""robomimic's own training pipeline (its config, `algo_factory`, `scripts.train.train`) on the project's files.

Needs the `[robomimic]` extra (`make robomimic`); skipped without it. robomimic 0.3.0 imports torchvision in
`robomimic.models` (for its image encoders) and no torchvision imports beside this project's CPU torch 2.13.0
(PyPI's 0.28.0 is built against CUDA torch: `operator torchvision::nms does not exist`). So when
`import torchvision` fails, the training process gets a stand-in: modules named torchvision,
torchvision.transforms(.functional) and torchvision.models whose every attribute is a function that raises
when called. Low-dimensional BC never calls them (they build image encoders and augmentations); a real
torchvision, where one imports, is used as is.
"""

import json
import math
import subprocess
import sys
from importlib.metadata import version

import pytest

from hma_gym.data.hdf5 import read_env_args
from hma_gym.envs.robosuite_env import DEFAULT_PROPRIO_KEYS

# every test here trains or collects (the `collected` fixture runs `hma-gym collect`)
pytestmark = pytest.mark.slow

TRAIN = r"""
import json, sys, types

def torchvision_stand_in():
    def attribute(module, attr):
        if attr.startswith("__"):  # __file__, __path__, ...: a plain module has none of these either
            raise AttributeError(attr)
        def call(*args, **kwargs):
            raise ImportError(f"{module}.{attr}: a stand-in (no torchvision imports beside this torch)")
        return call
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.models"):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr, name=name: attribute(name, attr)
        sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]

try:
    import torchvision  # noqa: F401
except (ImportError, RuntimeError):
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    torchvision_stand_in()

import torch
import robomimic.utils.train_utils as TrainUtils
from robomimic.config import config_factory
from robomimic.scripts.train import train

data, out, keys = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
config = config_factory("bc")
with config.values_unlocked():
    config.train.data = data
    config.train.output_dir = out
    config.train.num_epochs = 2
    config.train.batch_size = 16
    config.train.seq_length = 1
    config.train.num_data_workers = 0
    config.train.hdf5_cache_mode = "low_dim"
    config.train.hdf5_filter_key = "train"
    config.train.hdf5_validation_filter_key = "valid"
    config.train.dataset_keys = ["actions", "rewards", "dones"]
    config.train.cuda = False
    config.experiment.name = "bc_lowdim"
    config.experiment.validate = True
    config.experiment.epoch_every_n_steps = 5
    config.experiment.validation_epoch_every_n_steps = 2
    config.experiment.rollout.enabled = False  # needs its env wrapper, which needs mujoco_py
    config.experiment.render_video = False
    config.experiment.logging.terminal_output_to_txt = False
    config.experiment.logging.log_tb = True
    config.experiment.save.enabled = True
    config.experiment.save.every_n_epochs = 2
    config.observation.modalities.obs.low_dim = keys
    config.observation.modalities.obs.rgb = []
    config.algo.actor_layer_dims = [32, 32]

losses = []
run_epoch = TrainUtils.run_epoch
def recording_run_epoch(*args, **kwargs):
    log = run_epoch(*args, **kwargs)
    losses.append((kwargs.get("validate", False), log["Loss"]))
    return log
TrainUtils.run_epoch = recording_run_epoch
train(config, device=torch.device("cpu"))
print("RESULT " + json.dumps({"losses": losses}))
"""


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """4 expert episodes recorded by `hma-gym collect` (16x16 images; every 2nd demo held out)."""
    from hma_gym.cli import main

    path = tmp_path_factory.mktemp("robomimic") / "lift.hdf5"
    main(["collect", "--out", str(path), "--episodes", "4", "--image-size", "16", "--valid-every", "2",
          "--steps-after-success", "3", "--no-progress"])
    return path


def _synthetic_style(tmp_path):
    """What `synthesize` writes, without a world model: no MuJoCo states, `synthetic` in env_args."""
    import numpy as np

    from hma_gym.data.hdf5 import RobomimicWriter

    path = tmp_path / "synthetic.hdf5"
    writer = RobomimicWriter(path, {"env_name": "Lift", "type": 1, "env_kwargs": {}, "env_version": "1.5.2",
                                    "synthetic": True}, valid_every=2)
    for e in range(4):
        rng = np.random.default_rng(e)
        ep = writer.new_episode()
        for t in range(30):
            obs = {"agentview_image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                   "robot0_eef_pos": rng.normal(size=3).astype(np.float32),
                   "robot0_eef_quat": rng.normal(size=4).astype(np.float32),
                   "robot0_gripper_qpos": rng.normal(size=2).astype(np.float32)}
            ep.add_step(obs, np.tanh(rng.normal(size=7)), 0.0, t == 29, obs)
        writer.write_episode(ep)
    return path


@pytest.mark.parametrize("kind", ["collected", "synthetic"])
def test_robomimic_bc_trains_on_project_files(collected, tmp_path, kind):
    pytest.importorskip("psutil", reason="robomimic's train script needs the [robomimic] extra (make robomimic)")
    pytest.importorskip("tensorboardX", reason="robomimic's default logging needs the [robomimic] extra")
    path = collected if kind == "collected" else _synthetic_style(tmp_path)
    keys = ",".join(DEFAULT_PROPRIO_KEYS)
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(path), str(tmp_path / "rm"), keys], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert [valid for valid, _ in result["losses"]] == [False, True, False, True]  # 2 epochs, train + valid
    assert all(math.isfinite(loss) for _, loss in result["losses"])
    assert list((tmp_path / "rm").rglob("model_epoch_2.pth")), "robomimic saved no checkpoint"


def test_collected_files_name_the_env_version(collected):
    """robomimic compares `env_args["env_version"]` with the installed robosuite and warns when it is absent."""
    assert read_env_args(collected)["env_version"] == version("robosuite")
