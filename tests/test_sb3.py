"""stable-baselines3 policies load from their state dict, never by unpickling (`sb3:ALGO:PATH`)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3
import torch

from policies.registry import load_policy

# one torch thread: on this busy 2-core machine two OpenMP threads make the shipped models' steps many times slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_OBS = gym.spaces.Dict({"agentview_image": gym.spaces.Box(0, 255, (36, 36, 3), np.uint8),
                             "robot0_eef_pos": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)})
FLAT_OBS = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)


class SpacesEnv(gym.Env):
    """Just the spaces (a robomimic-like observation dict and the 7-D action box); SB3 only builds on them."""

    def __init__(self, observation_space=IMAGE_OBS):
        self.observation_space = observation_space
        self.action_space = gym.spaces.Box(-1, 1, (7,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code in a crafted file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def save_model(algo: str, path, env=None, policy: str = "MultiInputPolicy", seed: int = 0, **kwargs):
    """A small SB3 model with its weights moved off their initial values (so actions are far from 0), saved."""
    env = env or SpacesEnv()
    extra = {"buffer_size": 10} if algo in ("SAC", "TD3", "DDPG") else {}
    model = getattr(stable_baselines3, algo)(policy, env, device="cpu", seed=seed, **extra, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    model.save(path)
    return model


def batch(space, n: int = 4, seed: int = 1):
    space.seed(seed)
    samples = [space.sample() for _ in range(n)]
    if isinstance(space, gym.spaces.Dict):
        return {k: np.stack([s[k] for s in samples]) for k in space.spaces}
    return np.stack(samples)


def sb3_actions(model, obs):
    actions, _ = model.predict(obs, deterministic=True)
    return np.clip(actions, -1, 1)


@pytest.mark.parametrize("algo", ["PPO", "A2C", "SAC", "TD3", "DDPG"])
@pytest.mark.parametrize("observation_space, policy", [(IMAGE_OBS, "MultiInputPolicy"), (FLAT_OBS, "MlpPolicy")],
                         ids=["dict", "box"])
def test_loads_from_the_state_dict_with_sb3s_actions(algo, observation_space, policy, tmp_path):
    env = SpacesEnv(observation_space)
    path = tmp_path / "model.zip"
    model = save_model(algo, path, env, policy)
    loaded = load_policy(f"sb3:{algo}:{path}", env)
    obs = batch(observation_space)
    actions = loaded.act(obs)
    assert actions.shape == (4, 7) and actions.dtype == np.float32
    assert np.abs(actions).max() > 0.05  # not a degenerate all-zero policy
    np.testing.assert_allclose(actions, sb3_actions(model, obs), atol=1e-6)
    reloaded = getattr(stable_baselines3, algo).load(path, device="cpu")  # SB3's own loader, on our own file
    np.testing.assert_allclose(actions, sb3_actions(reloaded, obs), atol=1e-6)


def test_policy_kwargs_with_pickled_classes_are_rebuilt(tmp_path):
    """net_arch, a torch activation and an SB3 extractor's kwargs make `policy_kwargs` a pickled dict in `data`."""
    path = tmp_path / "ppo.zip"
    kwargs = {"net_arch": {"pi": [16, 8], "vf": [8]}, "activation_fn": torch.nn.ReLU,
              "features_extractor_kwargs": {"cnn_output_dim": 32}}
    model = save_model("PPO", path, policy_kwargs=kwargs)
    assert ":serialized:" in json.loads(zipfile.ZipFile(path).read("data"))["policy_kwargs"]
    loaded = load_policy(f"sb3:PPO:{path}", SpacesEnv())
    assert isinstance(loaded.model.mlp_extractor.policy_net[1], torch.nn.ReLU)
    obs = batch(IMAGE_OBS)
    np.testing.assert_allclose(loaded.act(obs), sb3_actions(model, obs), atol=1e-6)


def rewrite_zip(path, out, **entries):
    """A copy of the zip at `path` with some entries replaced."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, entries.get(name, src.read(name)))
    return out


def craft(path, marker, keys=None):
    """A copy of an SB3 zip whose pickled `data` values (those in `keys`, or all) create `marker` when unpickled."""
    payload = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    data = json.loads(zipfile.ZipFile(path).read("data"))
    crafted = {k: {**v, ":serialized:": payload} if isinstance(v, dict) and ":serialized:" in v
               and (keys is None or k in keys) else v for k, v in data.items()}
    assert any(v.get(":serialized:") == payload for v in crafted.values() if isinstance(v, dict))
    return rewrite_zip(path, path.with_name("crafted.zip"), data=json.dumps(crafted))


def test_a_crafted_zip_does_not_run_code_and_still_loads(tmp_path):
    """Every pickled value in `data` is replaced by a payload that creates a file when unpickled."""
    path = tmp_path / "ppo.zip"
    model = save_model("PPO", path)
    marker = tmp_path / "pwned"
    bad = craft(path, marker)

    try:
        policy = load_policy(f"sb3:PPO:{bad}", SpacesEnv())
    finally:
        assert not marker.exists(), "loading the crafted zip ran its payload"
    obs = batch(IMAGE_OBS)
    np.testing.assert_allclose(policy.act(obs), sb3_actions(model, obs), atol=1e-6)

    # the payload is live: SB3's own loader, which --trust-pickle opts into, does run it
    with pytest.raises(Exception):  # noqa: B017  (whatever SB3 makes of an open file as its policy class)
        load_policy(f"sb3:PPO:{bad}", SpacesEnv(), trust_pickle=True)
    assert marker.exists()


def test_a_pickled_object_in_policy_pth_is_refused(tmp_path):
    path = tmp_path / "ppo.zip"
    save_model("PPO", path)
    marker = tmp_path / "pwned"
    weights = io.BytesIO()
    torch.save({"w": Payload(marker)}, weights)
    bad = rewrite_zip(path, tmp_path / "crafted.zip", **{"policy.pth": weights.getvalue()})
    with pytest.raises(ValueError, match=r"crafted\.zip: its policy\.pth is not a plain tensor state dict"):
        load_policy(f"sb3:PPO:{bad}", SpacesEnv())
    assert not marker.exists()


class ShuffledExtractor(stable_baselines3.common.torch_layers.CombinedExtractor):
    """A user's own extractor class: only its pickle says what it is."""


def test_what_cannot_be_rebuilt_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "ppo.zip"
    model = save_model("PPO", path, policy_kwargs={"optimizer_class": torch.optim.SGD,
                                                   "features_extractor_class": ShuffledExtractor})
    with pytest.raises(ValueError, match=r"features_extractor_class.*--trust-pickle"):
        load_policy(f"sb3:PPO:{path}", SpacesEnv())
    trusted = load_policy(f"sb3:PPO:{path}", None, trust_pickle=True)  # SB3's loader needs no env
    obs = batch(IMAGE_OBS)
    np.testing.assert_allclose(trusted.act(obs), sb3_actions(model, obs), atol=1e-6)
    with pytest.raises(ValueError, match=r"DQN models cannot be loaded without unpickling.*--trust-pickle"):
        load_policy(f"sb3:DQN:{path}", SpacesEnv())


class FourDimActions(SpacesEnv):
    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Box(-1, 1, (4,), np.float32)


def test_clear_errors(tmp_path):
    path = tmp_path / "ppo.zip"
    save_model("PPO", path)
    with pytest.raises(ValueError, match="pass the env"):
        load_policy(f"sb3:PPO:{path}")
    with pytest.raises(ValueError, match=r"trained on a dict of observations; this env gives Box"):
        load_policy(f"sb3:PPO:{path}", SpacesEnv(FLAT_OBS))
    other_keys = gym.spaces.Dict({**IMAGE_OBS.spaces, "robot0_eef_quat": gym.spaces.Box(-1, 1, (4,), np.float32)})
    with pytest.raises(ValueError, match=r"trained on observations .*robot0_eef_pos.*this env gives .*eef_quat"):
        load_policy(f"sb3:PPO:{path}", SpacesEnv(other_keys))
    with pytest.raises(ValueError, match=r"trained with actions of shape \(7,\); this env's are \(4,\)"):
        load_policy(f"sb3:PPO:{path}", gym.vector.SyncVectorEnv([lambda: FourDimActions()]))
    with pytest.raises(ValueError, match="no SB3 model file"):
        load_policy(f"sb3:PPO:{tmp_path / 'missing.zip'}", SpacesEnv())
    (tmp_path / "not.zip").write_text("hello")
    with pytest.raises(ValueError, match="not an SB3 model zip"):
        load_policy(f"sb3:PPO:{tmp_path / 'not.zip'}", SpacesEnv())
    with pytest.raises(ValueError, match="policy class is not one of SAC's own"):
        load_policy(f"sb3:SAC:{path}", SpacesEnv())  # a PPO file given as SAC


@pytest.mark.slow
def test_evaluate_cli_runs_no_code_from_an_sb3_zip_unless_trust_pickle(lift_env, tmp_path):
    """`evaluate --policy sb3:PPO:...` in the GT env: the payload (in `lr_schedule`, which SB3's loader unpickles
    and then replaces, so the trusted load still works) runs only under --trust-pickle; both act alike."""
    from hma_gym.cli import main

    marker = tmp_path / "pwned"
    save_model("PPO", tmp_path / "ppo_lift.zip", SpacesEnv(lift_env.observation_space))
    path = craft(tmp_path / "ppo_lift.zip", marker, keys=("lr_schedule",))
    reports = []
    for extra in ([], ["--trust-pickle"]):
        out = tmp_path / f"report{len(reports)}.json"
        main(["evaluate", "--policy", f"sb3:PPO:{path}", "--env", "RobomimicLift-v0", "--episodes", "1",
              "--out", str(out), *extra])
        reports.append(json.loads(out.read_text()))
        assert marker.exists() == bool(extra)
    assert reports[0]["episodes"] == 1 and reports[0]["per_episode"] == reports[1]["per_episode"]
