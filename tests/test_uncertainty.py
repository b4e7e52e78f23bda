"""The world model's uncertainty: the entropy of its image-token distributions (`HMA.generate_frame`) and the
learned env's `info["uncertainty"]` built from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hma_gym.models.hma import EmbodimentSpec, make_hma

SPECS = {"arm": EmbodimentSpec(action_dim=3, state_dim=4), "hand": EmbodimentSpec(action_dim=2, state_dim=3)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generated_frame_reports_image_entropy_and_zero_state_entropy():
    """Image entropy is a fraction in [0, 1] per row; the trunk's state is regressed, so its entropy is zeros."""
    torch.manual_seed(1)
    model = make_hma("tiny", grid=4, vocab_size=16, n_action_tokens=2, max_frames=4, embodiments=SPECS).eval()
    cache = model.new_cache(4)
    ids = torch.tensor([0, 0, 1, 1])
    model.append_frame(cache, torch.randint(0, 16, (4, 4, 4)), torch.randn(4, 4), None, ids)
    for greedy in (True, False):
        _, state, unc = model.generate_frame(cache, torch.randn(4, 3), ids, greedy=greedy,
                                             generator=torch.Generator().manual_seed(0), return_uncertainty=True)
        assert set(unc) == {"image", "state"} and state.shape == (4, 4)
        assert unc["image"].shape == (4,) and bool(((unc["image"] >= 0) & (unc["image"] <= 1)).all())
        assert unc["state"].dtype == torch.float32 and torch.equal(unc["state"], torch.zeros(4))


def test_learned_env_uncertainty_is_finite_and_higher_on_noise():
    """The shipped default model, one step from a bank frame vs from the same start with its image replaced by
    uniform noise (the same action): the uncertainty is finite in both and higher on noise."""
    import gymnasium as gym

    import hma_gym  # noqa: F401

    keys = ("agentview_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    env = gym.make("HMA-RobomimicLift-v0", obs_keys=keys)  # a start needs the cube's state too
    obs, info = env.reset(seed=0)
    assert info["uncertainty"] == 0.0 and info["unjudged"] is False
    action = np.zeros(7, np.float32)
    clean = [env.step(action)[4]["uncertainty"] for _ in range(3)]
    noise = dict(obs, agentview_image=np.random.default_rng(0).integers(0, 256, obs["agentview_image"].shape,
                                                                          dtype=np.uint8))
    env.reset(seed=0, options={"initial_observation": noise})
    noisy = [env.step(action)[4]["uncertainty"] for _ in range(3)]
    env.close()
    assert np.isfinite(clean + noisy).all()
    assert 0 < max(clean) < min(noisy) < 1, (clean, noisy)
