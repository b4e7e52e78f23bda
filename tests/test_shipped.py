"""The shipped checkpoint: `gym.make("HMA-RobomimicLift-v0")` works out of the box and ships in the wheel."""

import subprocess
import sys
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from hma_gym.checkpoint import CHECKPOINT_FILES, check_checkpoint_dir
from hma_gym.envs.learned_env import ASSETS, VARIANTS, check_paired, default_checkpoint

# one torch thread: on this busy 2-core machine two OpenMP threads make the shipped models' steps many times slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def same_tensors(path, base, name: str) -> bool:
    """Whether two checkpoint directories hold the same `name`.safetensors (keys and values)."""
    from hma_gym.checkpoint import load_tensors

    a, b = load_tensors(path / f"{name}.safetensors"), load_tensors(base / f"{name}.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_from_gt_reset(learned: gym.Env, seed: int, steps: int = 3) -> None:
    """Spaces paired with the GT env's; reset from its observation, then `steps` zero-action steps give valid
    observations and a success probability."""
    check_paired(gym.make("RobomimicLift-v0"), learned)
    # the paired start holds the model's whole state (robomimic's `object` too, where the model predicts it)
    gt = gym.make("RobomimicLift-v0", obs_keys=tuple(learned.unwrapped.sim.model_space.spaces))
    gt_obs, _ = gt.reset(seed=seed)
    learned.reset(seed=seed, options={"initial_observation": gt_obs})
    for _ in range(steps):
        obs, reward, terminated, truncated, info = learned.step(np.zeros(7, np.float32))
    assert learned.observation_space.contains(obs) and 0 <= info["success_prob"] <= 1
    learned.close()
    gt.close()


def test_shipped_checkpoint_is_complete_and_small():
    path = default_checkpoint()
    config = check_checkpoint_dir(path)
    assert config["env"]["gt_env_id"] == "RobomimicLift-v0"
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 40e6, f"shipped checkpoint is {size / 1e6:.1f} MB"


@pytest.mark.slow
def test_fast_variant_is_a_shallower_maskgit_model_of_the_same_env():
    """variant="fast": the 2-layer MaskGIT checkpoint (blocks 0 and 3 of the default one, fine-tuned); same
    spaces, tokenizer and detector as the default checkpoint, and it steps."""
    path, base = default_checkpoint("fast"), default_checkpoint()
    config, base_config = check_checkpoint_dir(path), check_checkpoint_dir(base)
    assert config["dynamics"]["n_layer"] == 2 < base_config["dynamics"]["n_layer"]
    assert config["env"] == base_config["env"] and config["tokenizer"] == base_config["tokenizer"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 20e6
    for name in ("tokenizer", "detector"):
        assert same_tensors(path, base, name), name
    learned = gym.make("HMA-RobomimicLift-v0", variant="fast")
    assert learned.unwrapped.sim.wm.dynamics.config.n_layer == 2
    step_from_gt_reset(learned, seed=1)


@pytest.mark.slow
def test_shipped_15k_tokenizer_reconstructs_better_than_the_checkpoints_one():
    """hma_gym/assets/tokenizer_15k (make tokenizer-15k): 15,360 codes, and sharper on the GT reset frames of
    the shipped checkpoint's bank than that checkpoint's 1,000-code tokenizer (36.0 vs 32.0 dB when made)."""
    from hma_gym.checkpoint import load_tensors
    from hma_gym.metrics import psnr
    from hma_gym.world_model import load_tokenizer

    path = ASSETS / "tokenizer_15k"
    assert sum(p.stat().st_size for p in path.iterdir()) < 10e6
    frames = load_tensors(default_checkpoint() / "init_bank.safetensors")["agentview_image"]
    tokenizers = {"15k": load_tokenizer(path), "1k": load_tokenizer(default_checkpoint())}
    scores = {}
    for name, tokenizer in tokenizers.items():
        with torch.no_grad():
            scores[name] = float(psnr(tokenizer.decode_uint8(tokenizer.encode(frames)), frames).mean())
    assert tokenizers["15k"].codebook_size == 15360
    assert scores["15k"] > scores["1k"] + 2.0 and scores["15k"] > 33.0, scores


def test_fsq15k_variant_predicts_the_15k_tokenizers_codes_with_a_factorised_head():
    """variant="fsq15k": a MaskGIT model on the 15,360-code tokenizer's codes (its encoder is the shipped
    tokenizer_15k's), with the factorised head (35 logits a token); the default checkpoint's detector and
    env; it steps from a GT reset."""
    from hma_gym.checkpoint import load_tensors
    from hma_gym.world_model import load_tokenizer

    path, base = default_checkpoint("fsq15k"), default_checkpoint()
    config, base_config = check_checkpoint_dir(path), check_checkpoint_dir(base)
    assert config["env"] == base_config["env"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 20e6
    assert same_tensors(path, base, "detector")
    learned = gym.make("HMA-RobomimicLift-v0", variant="fsq15k")
    wm = learned.unwrapped.sim.wm
    assert wm.tokenizer.codebook_size == 15360 and wm.dynamics.config.factorized
    assert wm.dynamics.config.head_classes == 8 + 8 + 8 + 6 + 5
    frames = load_tensors(base / "init_bank.safetensors")["agentview_image"][:4]
    reference = load_tokenizer(ASSETS / "tokenizer_15k")
    with torch.no_grad():
        agree = (wm.tokenizer.encode(frames) == reference.encode(frames)).float().mean()
    assert agree > 0.99, float(agree)  # the packed copy is float16: a rare code may round differently
    step_from_gt_reset(learned, seed=2)


def test_make_without_arguments_matches_the_gt_env():
    learned = gym.make("HMA-RobomimicLift-v0")
    gt = gym.make("RobomimicLift-v0")
    check_paired(gt, learned)
    assert learned.spec.max_episode_steps == gt.spec.max_episode_steps == 100
    check_env(learned.unwrapped)
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(learned.unwrapped, warn=True)
    gt.close()
    gt = gym.make("RobomimicLift-v0", obs_keys=tuple(learned.unwrapped.sim.model_space.spaces))
    gt_obs, _ = gt.reset(seed=0)
    obs, _ = learned.reset(seed=0, options={"initial_observation": gt_obs})
    np.testing.assert_array_equal(obs["agentview_image"], gt_obs["agentview_image"])
    for _ in range(5):
        obs, reward, terminated, truncated, info = learned.step(np.zeros(7, np.float32))
    assert learned.observation_space.contains(obs) and 0 <= info["success_prob"] <= 1
    learned.close()
    gt.close()


def test_sb3_evaluate_policy_runs():
    from stable_baselines3.common.evaluation import evaluate_policy

    class Still:
        """A minimal SB3-style model: predict() -> zero actions."""

        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            n = len(obs["agentview_image"]) if obs["agentview_image"].ndim == 4 else 1
            return np.zeros((n, 7), np.float32), None

    env = gym.make("HMA-RobomimicLift-v0", max_episode_steps=5)
    mean, std = evaluate_policy(Still(), env, n_eval_episodes=2, warn=False)
    assert np.isfinite(mean) and 0 <= mean <= 5


@pytest.mark.slow
def test_wheel_contains_the_weights(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("hma_gym-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in VARIANTS.values():
        for name in CHECKPOINT_FILES:
            assert f"hma_gym/assets/{asset}/{name}" in names, (asset, name)
    for name in ("policy.json", "policy.safetensors"):
        assert f"policies/assets/dp_lift/{name}" in names, name


def test_shipped_diffusion_policy_loads_and_acts():
    """`dp-lift` by name: the shipped Diffusion Policy gives an action chunk for GT observations."""
    from policies.registry import load_policy

    env = gym.make("RobomimicLift-v0")
    obs, _ = env.reset(seed=0)
    policy = load_policy("dp-lift", env, seed=0)
    batch = {k: v[None] for k, v in obs.items()}
    policy.reset()
    action = policy.act(batch)
    env.close()
    assert action.shape == (1, 7) and np.all(np.isfinite(action)) and np.all(np.abs(action) <= 1.0 + 1e-6)
