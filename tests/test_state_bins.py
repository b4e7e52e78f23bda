"""Binned state values (EmbodimentSpec.state_bins): trained as a category, generated as one committed draw; and the
model's uncertainty (entropies of its token and state distributions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hma_gym.models.hma import EmbodimentSpec, HMAConfig, make_hma

EDGES = (-0.5, 0.0, 0.5)  # 4 intervals of state value 2: (-inf, -0.5], (-0.5, 0], (0, 0.5], (0.5, inf)
SPECS = {"arm": EmbodimentSpec(action_dim=3, state_dim=4, state_bins=((2, EDGES),)),
         "hand": EmbodimentSpec(action_dim=2, state_dim=3)}  # a robot without bins in the same batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return make_hma("tiny", grid=4, vocab_size=16, n_action_tokens=2, max_frames=4, embodiments=SPECS)


def batch(B: int = 4, T: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(B) % 2
    states = torch.randn(B, T, 4, generator=g)
    states[ids == 1, :, 3:] = 0
    return {"tokens": torch.randint(0, 16, (B, T, 4, 4), generator=g), "actions": torch.randn(B, T, 3, generator=g),
            "states": states, "embodiment_ids": ids, "n_prompt": torch.ones(B, dtype=torch.long)}


def test_spec_validation_and_round_trip():
    with pytest.raises(ValueError, match="outside the state"):
        EmbodimentSpec(action_dim=1, state_dim=2, state_bins=((2, (0.0,)),))
    with pytest.raises(ValueError, match="increasing"):
        EmbodimentSpec(action_dim=1, state_dim=3, state_bins=((1, (0.5, 0.5)),))
    cfg = tiny().config
    again = HMAConfig.from_dict(cfg.to_dict())
    assert again.embodiments["arm"].state_bins == ((2, EDGES),)


def test_bin_loss_trains_the_bin_head():
    model = tiny()
    b = batch()
    loss, metrics = model(b)
    assert metrics["state_bin_ce"] > 0.5  # ~log(4) at init
    loss.backward()
    assert model.embodiments["arm"].bin_heads[0].weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(metrics["state_bin_ce"])
    for _ in range(60):
        opt.zero_grad()
        loss, metrics = model(b)
        loss.backward()
        opt.step()
    assert float(metrics["state_bin_ce"]) < 0.5 * first  # one batch, memorised


def force(model, interval: int, name: str = "arm") -> None:
    """The bin head always says `interval`."""
    head = model.embodiments[name].bin_heads[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[interval] = 30.0


@pytest.mark.parametrize("interval,low,high", [(0, -np.inf, -0.5), (2, 0.0, 0.5), (3, 0.5, np.inf)])
def test_generated_value_commits_to_the_drawn_interval(interval, low, high):
    model = tiny(seed=1).eval()
    force(model, interval)
    cache = model.new_cache(4)
    ids = torch.tensor([0, 0, 1, 1])
    model.append_frame(cache, torch.randint(0, 16, (4, 4, 4)), torch.randn(4, 4), None, ids)
    for greedy in (True, False):
        _, state, unc = model.generate_frame(cache, torch.randn(4, 3), ids, greedy=greedy,
                                             generator=torch.Generator().manual_seed(0), return_uncertainty=True)
        value = state[:2, 2]
        assert bool(((value > low) & (value <= high)).all()), (value, low, high)
        assert unc["state"][:2].max() < 1e-6 and unc["state"][2:].abs().max() == 0  # certain; no bins
        assert bool(((unc["image"] >= 0) & (unc["image"] <= 1)).all())


def test_draws_follow_the_interval_probabilities():
    model = tiny(seed=2).eval()
    head = model.embodiments["arm"].bin_heads[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    n = 2000
    cache = model.new_cache(n)
    ids = torch.zeros(n, dtype=torch.long)
    model.append_frame(cache, torch.randint(0, 16, (n, 4, 4)), torch.randn(n, 4), None, ids)
    _, state, unc = model.generate_frame(cache, torch.randn(n, 3), ids, generator=torch.Generator().manual_seed(3),
                                         return_uncertainty=True)
    counts = torch.bucketize(state[:, 2].contiguous(), torch.tensor(EDGES)).bincount(minlength=4).float() / n
    assert torch.allclose(counts, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.04)
    entropy = -(torch.tensor([0.1, 0.2, 0.3, 0.4]) * torch.tensor([0.1, 0.2, 0.3, 0.4]).log()).sum() / np.log(4)
    assert torch.allclose(unc["state"], entropy.expand(n), atol=1e-4)


def test_learned_env_uncertainty_is_finite_and_higher_on_noise():
    """The shipped default model, one step from a bank frame vs from the same start with its image replaced by
    uniform noise (the same action): the uncertainty is finite in both and higher on noise."""
    import gymnasium as gym

    import hma_gym  # noqa: F401

    env = gym.make("HMA-RobomimicLift-v0")
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


@pytest.fixture(scope="module")
def object_checkpoint(tmp_path_factory):
    """The shipped model grown by add-state to predict `object` (not trained further), packed with a bank of
    two real GT starts that hold `object`."""
    from hma_gym.envs.learned_env import default_checkpoint
    from training.add_state import AddStateConfig, add_state
    from training.collect import CollectConfig, collect
    from training.pack import PackConfig, pack

    tmp = tmp_path_factory.mktemp("object")
    data = tmp / "d.hdf5"
    collect(CollectConfig(out=str(data), policy="zero", episodes=2, max_steps=3, seed=11, progress=False))
    keys = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    add_state(AddStateConfig(init=str(default_checkpoint()), data=str(data), proprio_keys=keys, out=str(tmp / "r")))
    lift = str(default_checkpoint())
    pack(PackConfig(out=str(tmp / "ckpt"), tokenizer=lift, dynamics=str(tmp / "r"), detector=lift, data=str(data),
                    bank_size=2))
    return tmp / "ckpt"


@pytest.mark.parametrize("interval,lifted", [(1, False), (6, True), (10, True)])
def test_learned_success_follows_the_predicted_object_state(object_checkpoint, interval, lifted):
    """A model whose cube-height interval is forced: the env's verdict is the task's predicate on the predicted
    object state (interval 6 starts just above the 0.84 m threshold), `object` is returned only when asked,
    and a paired start without `object` is refused with a hint."""
    import gymnasium as gym

    import hma_gym  # noqa: F401
    from hma_gym.tasks import LIFT, OBJECT_KEY

    keys = ("agentview_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", OBJECT_KEY)
    plain = gym.make("HMA-RobomimicLift-v0", checkpoint=object_checkpoint)
    assert OBJECT_KEY not in plain.observation_space.spaces
    obs, _ = plain.reset(seed=0)
    with pytest.raises(ValueError, match="lacks 'object'.*obs_keys"):
        plain.reset(options={"initial_observation": obs})
    plain.close()

    env = gym.make("HMA-RobomimicLift-v0", checkpoint=object_checkpoint, obs_keys=keys)
    force(env.unwrapped.sim.wm.dynamics, interval, name="panda_osc_pose")
    obs, _ = env.reset(seed=0)
    assert not LIFT.success(obs[OBJECT_KEY])  # a GT start: the cube rests
    obs, reward, terminated, _, info = env.step(np.zeros(7, np.float32))
    height = float(LIFT.field(obs[OBJECT_KEY], "cube_pos")[2])
    edges = (-np.inf, *LIFT.verdict_edges, np.inf)
    assert edges[interval] < height <= edges[interval + 1]
    assert info["is_success"] == lifted == bool(LIFT.success(obs[OBJECT_KEY])) == terminated
    assert reward == float(lifted) and info["uncertainty"] < 0.5
    env.close()


def test_add_state_grows_the_state_and_keeps_the_frames(tmp_path):
    """`hma-gym add-state` on the shipped model: 19 state dims with the cube height binned at the task's edges
    (the success threshold among them); from the same history it generates the same greedy frame and the
    same old state dims as the source, whatever the new dims hold."""
    from hma_gym.checkpoint import load_tensors
    from hma_gym.envs.learned_env import default_checkpoint
    from hma_gym.tasks import LIFT
    from hma_gym.world_model import load_dynamics
    from training.add_state import AddStateConfig, add_state
    from training.collect import CollectConfig, collect

    data = tmp_path / "d.hdf5"
    collect(CollectConfig(out=str(data), policy="random-smooth", episodes=2, max_steps=5, seed=7, progress=False,
                          valid_every=2))
    keys = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    with pytest.raises(ValueError, match="followed by the new ones"):
        add_state(AddStateConfig(init=str(default_checkpoint()), data=str(data), proprio_keys=keys[1:],
                                 out=str(tmp_path / "bad")))
    add_state(AddStateConfig(init=str(default_checkpoint()), data=str(data), proprio_keys=keys,
                             out=str(tmp_path / "r")))
    source, _ = load_dynamics(default_checkpoint())
    grown, meta = load_dynamics(tmp_path / "r")
    assert meta["proprio_keys"] == list(keys)
    spec = grown.config.embodiments["panda_osc_pose"]
    assert spec.state_dim == 19 and spec.state_bins[0][0] == 9 + 2  # object's cube z
    norm = load_tensors(tmp_path / "r" / "normalization.safetensors")
    mean, std = norm["panda_osc_pose/state_mean"][11], norm["panda_osc_pose/state_std"][11]
    world = np.asarray(spec.state_bins[0][1]) * float(std) + float(mean)
    np.testing.assert_allclose(world, LIFT.verdict_edges, atol=1e-5)
    assert LIFT.table_height + LIFT.lift_margin in LIFT.verdict_edges

    # the same history in world units, normalised with each model's own statistics (add-state refits them on
    # the data and folds the change into the stems and heads)
    src_norm = load_tensors(default_checkpoint() / "normalization.safetensors")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 16, 16), generator=g)
    p = "panda_osc_pose/"
    raw_state = src_norm[p + "state_mean"] + src_norm[p + "state_std"] * torch.randn(2, 9, generator=g)
    raw_object = torch.tensor([[0.0, 0.0, 0.82, 0, 0, 0, 1, 0, 0, 0.1]] * 2)
    raw_action = torch.rand(2, 7, generator=g) * 2 - 1  # uniform random actions, far outside expert statistics
    ids = torch.zeros(2, dtype=torch.long)
    outs = []
    for model, stats, state in ((source, src_norm, raw_state), (grown, norm, torch.cat([raw_state, raw_object], 1))):
        s_norm = (state - stats[p + "state_mean"]) / stats[p + "state_std"]
        a_norm = (raw_action - stats[p + "action_mean"]) / stats[p + "action_std"]
        cache = model.new_cache(2)
        model.append_frame(cache, tokens, s_norm, None, ids)
        frame, s_pred = model.generate_frame(cache, a_norm, ids, greedy=True)
        outs.append((frame, s_pred[:, :9] * stats[p + "state_std"][:9] + stats[p + "state_mean"][:9]))
    assert (outs[0][0] == outs[1][0]).float().mean() > 0.99  # float rounding of the folded weights may flip a tie
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-3, rtol=1e-3)
    # the statistics are the data's (train split), not the source's
    from hma_gym.data.hdf5 import list_demos, read_demo

    actions = np.concatenate([read_demo(data, d)["actions"] for d in list_demos(data, "train")])
    np.testing.assert_allclose(norm["panda_osc_pose/action_mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(norm["panda_osc_pose/action_std"], np.maximum(actions.std(0), 1e-2), atol=1e-5)


def test_checkpoints_without_object_state_warn_that_their_verdict_is_unverified(object_checkpoint):
    import warnings

    import gymnasium as gym

    import hma_gym  # noqa: F401
    from hma_gym.envs.learned_env import UnverifiedVerdictWarning

    with pytest.warns(UnverifiedVerdictWarning, match="does not predict the object state"):
        gym.make("HMA-RobomimicLift-v0", variant="fast").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedVerdictWarning)
        gym.make("HMA-RobomimicLift-v0", checkpoint=object_checkpoint).close()
