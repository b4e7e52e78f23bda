"""The proprio + object-state dynamics (hma_gym.models.state_model), its trainer, and the learned env's verdicts
from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hma_gym.models.state_model import StateModel, StateModelConfig, grasp_labels, rollout_loss
from hma_gym.tasks import LIFT, OBJECT_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", OBJECT_KEY)
Z = 9 + 2  # the cube's height in the state (eef pos 3, eef quat 4, gripper 2, then object: cube pos first)


def lift_config(**kw) -> StateModelConfig:
    from training.train_state import StateTrainConfig, model_config

    widths = dict(zip(KEYS, (3, 4, 2, 10), strict=True))
    return model_config(StateTrainConfig(data=("x",), hidden=16, layers=1, **kw), widths, 7)


def start_state(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 19, generator=g) * 0.1
    s[:, 3:7] = torch.nn.functional.normalize(s[:, 3:7] + torch.tensor([1.0, 0, 0, 0]), dim=-1)
    s[:, 12:16] = torch.nn.functional.normalize(s[:, 12:16] + torch.tensor([0, 0, 0, 1.0]), dim=-1)
    s[:, Z] = 0.82
    s[:, 16:19] = s[:, 9:12] - s[:, :3]
    return s


def test_layout_from_the_task():
    cfg = lift_config()
    assert cfg.state_dim == 19
    assert cfg.object_pose == list(range(9, 16)) and cfg.object_pos == [9, 10, 11]
    assert cfg.derived == [(16, 9, 0, 3)]  # gripper-to-cube = cube position - eef position
    assert cfg.quaternions == [3, 12]
    assert StateModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("contact", [False, True])
def test_the_object_moves_only_on_contact_and_the_state_stays_consistent(contact):
    """A model whose contact output is forced: without contact the object's pose is kept bit for bit whatever
    the regressed change; with it the pose moves. Either way gripper-to-cube = cube - eef and quaternions are
    unit length."""
    torch.manual_seed(0)
    model = StateModel(lift_config()).eval()
    with torch.no_grad():
        model.contact_head.bias.fill_(50.0 if contact else -50.0)
        model.delta_head.bias.fill_(3.0)
        model.grasp_net[-1].bias.fill_(-50.0)
    s = start_state()
    a = torch.rand(3, 7) * 2 - 1
    nxt, grasp, _, fired, unc = model.step(s, s, a, torch.zeros(3, 7), torch.zeros(3), torch.zeros(3))
    assert bool((fired == contact).all()) and bool((unc < 1e-6).all())
    if contact:
        assert not torch.equal(nxt[:, 9:16], s[:, 9:16])
    else:
        assert torch.equal(nxt[:, 9:16], s[:, 9:16])
    assert not torch.allclose(nxt[:, :3], s[:, :3])  # the arm moves regardless
    torch.testing.assert_close(nxt[:, 16:19], nxt[:, 9:12] - nxt[:, :3])
    torch.testing.assert_close(nxt[:, 3:7].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(nxt[:, 12:16].norm(dim=-1), torch.ones(3))


def test_rollout_loss_trains_contact_and_motion():
    """A few hundred steps on synthetic windows (the cube moves with the gripper when the gripper is closed
    and near it): the loss falls and the contact classifier beats chance."""
    torch.manual_seed(0)
    model = StateModel(lift_config())
    B, K = 64, 4
    g = torch.Generator().manual_seed(1)

    def windows():
        s = start_state(B, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        held = torch.rand(B, generator=g) < 0.5
        states, actions = [s], []
        for _ in range(K):
            a = torch.rand(B, 7, generator=g) * 2 - 1
            a[:, 6] = torch.where(held, 1.0, -1.0)
            nxt = states[-1].clone()
            nxt[:, :3] += 0.01 * a[:, :3]
            nxt[:, 9:12] += torch.where(held[:, None], 0.01 * a[:, :3], torch.zeros(B, 3))
            nxt[:, 16:19] = nxt[:, 9:12] - nxt[:, :3]
            states.append(nxt)
            actions.append(a)
        return torch.stack(states, 1), torch.stack(actions, 1)

    from training.train_state import Demo, fit_statistics

    st, ac = windows()
    fit_statistics(model, [Demo(st[i].numpy(), ac[i].numpy()) for i in range(B)])
    no_grasp = torch.zeros(B, K)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, accs = [], []
    for _ in range(150):
        st, ac = windows()
        loss, metrics = rollout_loss(model, st, ac, st[:, 0], torch.zeros(B, 7), torch.ones(B, K, dtype=torch.bool),
                                     no_grasp, no_grasp.bool())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float(metrics["contact_acc"]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert np.mean(accs[-10:]) > 0.9


def test_grasp_labels_tell_a_close_that_lifts_from_one_that_does_not():
    """A close command is labelled by what followed it until the next close (after more than `gap` open steps):
    did the cube rise more than 1.5 cm above its lowest point? The label holds from the close to the next one;
    each episode's closes weigh 1."""
    command = np.where(np.arange(20) >= 2, 1.0, -1.0)  # closes at step 2
    rest = np.full(21, 0.82)
    lifted = rest.copy()
    lifted[12:] = np.linspace(0.82, 0.90, 9)
    held, weight = grasp_labels(lifted, command)
    assert weight.tolist() == [float(t == 2) for t in range(20)]  # the label is read at the close command
    assert held.tolist() == [float(t >= 2) for t in range(20)]
    assert not grasp_labels(rest, command)[0].any()  # closed beside the cube: it stayed
    tipped = rest.copy()
    tipped[10:] = 0.828  # pushed onto an edge: not lifted
    assert not grasp_labels(tipped, command)[0].any()
    settling = np.concatenate([np.linspace(0.83, 0.82, 5), rest[5:]])  # the cube settling after the reset
    assert not grasp_labels(settling, command)[0].any()
    twice = command.copy()
    twice[7:12] = -1.0  # opened at 7 for 5 steps, closed again at 12 (after which the cube rose): a new grasp
    held, weight = grasp_labels(lifted, twice)
    assert held.tolist() == [float(t >= 12) for t in range(20)]  # 2-11: nothing rose before the next close
    np.testing.assert_allclose(weight, [0.5 * (t in (2, 12)) for t in range(20)])
    flicker = command.copy()
    flicker[10:12] = -1.0  # opened for 2 steps only (a sampled policy's flicker): the grasp goes on
    held, weight = grasp_labels(lifted, flicker)
    assert held.tolist() == [float(t >= 2) for t in range(20)]
    np.testing.assert_allclose(weight, [0.5 * (t in (2, 12)) for t in range(20)])
    assert grasp_labels(lifted, flicker, gap=1)[0].tolist() == [float(t >= 12) for t in range(20)]


def test_grasp_labels_decide_where_a_close_has_lasted_grasp_steps():
    """With steps=3 the decision is where the close command has lasted 3 steps; a close given up after 2 (the
    expert's early release) decides nothing."""
    command = np.full(20, -1.0)
    command[2:4] = 1.0  # given up after 2 steps
    command[8:] = 1.0  # closed for good at 8: decided at 10
    lifted = np.full(21, 0.82)
    lifted[14:] = np.linspace(0.82, 0.90, 7)
    held, weight = grasp_labels(lifted, command, steps=3)
    assert weight.tolist() == [float(t == 10) for t in range(20)]
    assert held.tolist() == [float(t >= 10) for t in range(20)]
    assert not grasp_labels(np.full(21, 0.82), command, steps=3)[0].any()


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("held", [False, True])
def test_the_grasp_is_decided_after_grasp_steps_close_commands_and_kept_until_the_next(held, steps):
    """The grasp classifier's decision is read only where a close command has lasted `grasp_steps` steps (a
    close given up sooner decides nothing); later steps keep it whatever the classifier says, through open
    commands, until the next decision. The decision is an input of the dynamics."""
    torch.manual_seed(0)
    model = StateModel(lift_config(grasp_steps=steps)).eval()
    with torch.no_grad():
        model.grasp_net[-1].bias.fill_(50.0 if held else -50.0)
    s = start_state(1)
    close, open_ = torch.zeros(1, 7), torch.zeros(1, 7)
    close[:, 6], open_[:, 6] = 1.0, -1.0
    grasp, closed = torch.zeros(1), torch.zeros(1)

    def step(a, a_prev):
        nonlocal grasp, closed
        _, grasp, closed, _, _ = model.step(s, s, a, a_prev, grasp, closed)
        return grasp.item()

    assert step(open_, open_) == 0.0  # no close command
    prev = open_
    for _ in range(steps - 1):  # a close given up before the grasp is decided
        assert step(close, prev) == 0.0
        prev = close
    assert step(open_, prev) == 0.0 and closed.item() == 0
    prev = open_
    for k in range(steps):
        assert step(close, prev) == (float(held) if k == steps - 1 else 0.0)
        prev = close
    with torch.no_grad():
        model.grasp_net[-1].bias.fill_(-50.0 if held else 50.0)  # the classifier changes its mind
    assert step(close, close) == float(held)  # kept
    assert step(open_, close) == float(held)  # kept after the gripper opens
    prev = open_
    for k in range(steps):  # re-decided once the next close has lasted `grasp_steps`
        assert step(close, prev) == float(held if k < steps - 1 else not held)
        prev = close
    x = model.features(s, s, close, close)
    assert not torch.equal(model(x, torch.zeros(1))[0], model(x, torch.ones(1))[0])


@pytest.fixture(scope="module")
def state_checkpoint(tmp_path_factory):
    """A copy of the shipped default model whose reset bank is the first observations of a few collected GT
    episodes, given a state model trained for a few steps on them by `train-state --into`."""
    import shutil

    from hma_gym.checkpoint import load_tensors, save_tensors
    from hma_gym.data.hdf5 import list_demos, read_demo
    from hma_gym.envs.learned_env import default_checkpoint
    from training.collect import CollectConfig, collect
    from training.train_state import StateTrainConfig, train_state

    tmp = tmp_path_factory.mktemp("state")
    data = tmp / "d.hdf5"
    collect(CollectConfig(out=str(data), policy="random-smooth", episodes=4, max_steps=6, seed=11, progress=False,
                          valid_every=2))
    ckpt = tmp / "ckpt"
    shutil.copytree(default_checkpoint(), ckpt)
    bank = load_tensors(ckpt / "init_bank.safetensors")
    firsts = [read_demo(data, n)["obs"] for n in list_demos(data, "train")]
    save_tensors(ckpt / "init_bank.safetensors",
                 {k: torch.from_numpy(np.stack([f[k][0] for f in firsts])) for k in bank})
    cfg = dict(data=(str(data),), steps=4, batch_size=4, window=3, eval_every=2, save_every=2, hidden=32, layers=1,
               progress=False, into=(str(ckpt),))
    other = tmp / "other.hdf5"
    collect(CollectConfig(out=str(other), policy="zero", episodes=2, max_steps=2, seed=99, progress=False))
    with pytest.raises(Exception, match="reset bank"):  # the file the bank was not made from
        train_state(StateTrainConfig(out=str(tmp / "bad"), bank_data=str(other), **cfg))
    metrics = train_state(StateTrainConfig(out=str(tmp / "run"), bank_data=str(data), **cfg))
    assert 0.0 <= metrics["verdict_agreement"] <= 1.0
    return ckpt


def test_train_state_into_a_checkpoint_adds_the_object_state(state_checkpoint):
    """The learned env of that checkpoint returns `object` when asked (its start: the GT's), stays quiet about
    unverified verdicts, and a start without `object` gets the object state of the bank's nearest frame."""
    import warnings

    import gymnasium as gym

    import hma_gym  # noqa: F401
    from hma_gym.envs.learned_env import UnverifiedVerdictWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedVerdictWarning)
        plain = gym.make("HMA-RobomimicLift-v0", checkpoint=state_checkpoint)
    assert OBJECT_KEY not in plain.observation_space.spaces
    obs, _ = plain.reset(seed=3)
    sim = plain.unwrapped.sim
    drawn = sim.obs[OBJECT_KEY][0].copy()
    plain.reset(options={"initial_observation": obs})  # a start without `object`: taken from the nearest frame
    np.testing.assert_allclose(sim.obs[OBJECT_KEY][0], drawn, atol=1e-6)  # a bank start: its own
    shifted = dict(obs, robot0_eef_pos=obs["robot0_eef_pos"] + np.float32(0.01))
    plain.reset(options={"initial_observation": shifted})  # gripper-to-cube follows the given gripper
    np.testing.assert_allclose(sim.obs[OBJECT_KEY][0][7:], drawn[7:] - 0.01, atol=1e-5)
    with pytest.raises(ValueError, match="lacks 'agentview_image'"):
        plain.reset(options={"initial_observation": {k: v for k, v in obs.items() if k != "agentview_image"}})
    plain.close()
    env = gym.make("HMA-RobomimicLift-v0", checkpoint=state_checkpoint, obs_keys=("agentview_image", *KEYS))
    obs, _ = env.reset(seed=0)
    assert obs[OBJECT_KEY].shape == (10,) and not LIFT.success(obs[OBJECT_KEY])
    obs, *_ = env.step(np.zeros(7, np.float32))
    np.testing.assert_allclose(obs[OBJECT_KEY][7:], obs[OBJECT_KEY][:3] - obs["robot0_eef_pos"], atol=1e-6)
    env.close()


@pytest.mark.parametrize("contact,held,lifted", [(False, True, False), (True, True, True), (True, False, False)])
def test_learned_success_follows_the_predicted_object_state(state_checkpoint, contact, held, lifted):
    """The state model's outputs forced: the cube's height change is large and positive; only with contact does
    the cube move, only under a close that holds can it rise past its rest height + `held_rise`, and the env's
    verdict is the task's predicate on the predicted object state. The trunk gets the state model's proprio."""
    import gymnasium as gym

    import hma_gym  # noqa: F401

    env = gym.make("HMA-RobomimicLift-v0", checkpoint=state_checkpoint, obs_keys=("agentview_image", *KEYS))
    sim = env.unwrapped.sim
    model = sim.state_model
    cap = model.cfg.rest_height + model.cfg.held_rise
    with torch.no_grad():
        model.contact_head.weight.zero_()
        model.contact_head.bias.fill_(50.0 if contact else -50.0)
        model.grasp_net[-1].weight.zero_()
        model.grasp_net[-1].bias.fill_(50.0 if held else -50.0)
        model.delta_head.weight.zero_()
        model.delta_head.bias.zero_()
        # the cube's height: a change of 0.1 m
        model.delta_head.bias[Z] = (0.1 - model.delta_mean[Z]) / model.delta_std[Z]
    obs, _ = env.reset(seed=0)
    start = obs[OBJECT_KEY].copy()
    close = np.zeros(7, np.float32)
    close[-1] = 1.0  # close commands: the grasp decision is read at the `grasp_steps`-th
    for _ in range(model.cfg.grasp_steps - 1):  # not decided yet: the cube rises at most to the cap
        obs, reward, terminated, _, info = env.step(close)
        assert not info["is_success"] and not terminated and obs[OBJECT_KEY][2] <= cap + 1e-6
    before = obs[OBJECT_KEY][2] if model.cfg.grasp_steps > 1 else start[2]
    obs, reward, terminated, _, info = env.step(close)
    assert info["is_success"] == lifted == bool(LIFT.success(obs[OBJECT_KEY])) == terminated
    assert reward == float(lifted)
    if not contact:
        np.testing.assert_array_equal(obs[OBJECT_KEY][:7], start[:7])
    elif held:
        assert obs[OBJECT_KEY][2] >= before + 0.1 - 1e-4
    else:
        assert start[2] < obs[OBJECT_KEY][2] <= cap + 1e-6
    assert 0.0 <= info["uncertainty"] < 0.5
    env.close()


def test_a_checkpoint_without_a_state_model_warns_that_its_verdict_is_unverified(tmp_path):
    """The shipped checkpoints carry a state model and make quietly; the same checkpoint without it falls back
    to the pixel detector and says that its verdict does not fail bad policies."""
    import json
    import shutil
    import warnings

    import gymnasium as gym

    import hma_gym  # noqa: F401
    from hma_gym.envs.learned_env import VARIANTS, UnverifiedVerdictWarning, default_checkpoint

    for variant in VARIANTS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnverifiedVerdictWarning)
            gym.make("HMA-RobomimicLift-v0", variant=variant).close()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(default_checkpoint(), ckpt)
    (ckpt / "state_model.safetensors").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    del config["state_model"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.warns(UnverifiedVerdictWarning, match="does not predict the object state.*train-state"):
        env = gym.make("HMA-RobomimicLift-v0", checkpoint=ckpt)
    assert OBJECT_KEY not in env.unwrapped.sim.model_space.spaces
    env.close()


def test_a_state_model_file_without_its_config_is_refused(tmp_path):
    import json
    import shutil

    from hma_gym.checkpoint import CheckpointError
    from hma_gym.envs.learned_env import default_checkpoint
    from hma_gym.world_model import load_state_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(default_checkpoint(), ckpt)
    assert load_state_model(ckpt) is not None
    config = json.loads((ckpt / "config.json").read_text())
    del config["state_model"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no 'state_model' section"):
        load_state_model(ckpt)

