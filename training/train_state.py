"""`hma-gym train-state`: fit the world model's low-dimensional dynamics (`hma_gym.models.state_model`).

Data: robomimic files recorded with the task's object state (every `collect` file has `object`), ideally a mix
of behaviours (`make interaction-data`: expert failure modes, random and noisy policies), since the model has
to know what happens when a grasp misses as well as when it holds. Only low-dimensional keys are read.

Training runs the model on its own predictions over windows of `window` steps (teacher-forcing only the
contact gate and the grasp decision, whose labels come from the data: `grasp_labels`), so that it learns to
stay on track over a whole episode. The held-out evaluation replays the
valid demos' actions open-loop from their first state for the whole episode and compares the task's success
predicate on the predicted object state with the same predicate on the recorded one: the verdict agreement
that matters for the learned env.

`--into CHECKPOINT ...` puts the result into packed checkpoints: `state_model.safetensors`, its config under
`state_model` in config.json, and the object state added to the reset bank (read from `--bank-data`, the file
whose train-split first observations made the bank). The learned env then returns the object state, takes its
proprio from this model, and scores success with the task's predicate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hma_gym.checkpoint import CheckpointError, load_json, load_tensors, save_json, save_module, save_tensors
from hma_gym.config import to_jsonable
from hma_gym.data.hdf5 import DatasetError, list_demos, validate_file
from hma_gym.models.state_model import STATE_MODEL_NAME, StateModel, StateModelConfig, grasp_labels, rollout_loss
from hma_gym.tasks import OBJECT_KEY, object_task
from training.loop import LoopConfig, train_loop

DEFAULT_STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", OBJECT_KEY)


@dataclass
class StateTrainConfig(LoopConfig):
    """Train the low-dimensional dynamics (proprio + object state) on robomimic files."""

    data: tuple[str, ...] = ("data/lift.hdf5",)
    """robomimic files recorded with the object state (their train/valid masks split them)."""
    keys: tuple[str, ...] = DEFAULT_STATE_KEYS
    """Low-dimensional observation keys of the state, in order (the object key among them)."""
    task: str = "Lift"
    """robosuite task: its object-state layout (`hma_gym.tasks`) says which dims rest and which are derived."""
    out: str = "runs/state_model"
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 200
    eval_every: int = 1000
    save_every: int = 1000
    window: int = 16
    """Steps each training window is unrolled over."""
    hidden: int = 256
    layers: int = 3
    grasp_steps: int = 5
    """The grasp is decided at the 5th consecutive close command: the fingers are still in the air for every
    grasp then (they reach a 4 cm cube ~6 steps after the command), and a grasp given up sooner (the scripted
    expert's early release: 2-6 steps) decides nothing."""
    eval_demos: int = 100
    """At most this many valid demos per file are replayed in the held-out evaluation."""
    into: tuple[str, ...] = ()
    """Packed checkpoints to put the trained model into (see the module doc)."""
    bank_data: str = "data/lift.hdf5"
    """With --into: the file whose train-split first observations are the checkpoint's reset bank."""

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("--data needs at least one robomimic file")
        if self.window < 1:
            raise ValueError(f"window must be >= 1. Got {self.window=}")
        if OBJECT_KEY not in self.keys:
            raise ValueError(f"keys must include {OBJECT_KEY!r} (the object state the verdict is made from)")


@dataclass
class Demo:
    states: np.ndarray  # (L+1, S) float32: obs of every step, then the last next_obs
    actions: np.ndarray  # (L, A) float32
    grasp: np.ndarray | None = None  # (L,) float32: the grasp decision in force (`grasp_labels`)
    grasp_weight: np.ndarray | None = None  # (L,) float32: the weight of the grasp label (> 0 where decided)

    def label_grasps(self, cfg: StateModelConfig) -> None:
        self.grasp, self.grasp_weight = grasp_labels(self.states[:, cfg.object_pos[-1]], self.actions[:, -1],
                                                     cfg.held_rise, cfg.regrasp_gap, cfg.grasp_steps)


def load_demos(paths: tuple[str, ...], keys: tuple[str, ...], split: str) -> list[Demo]:
    """The low-dimensional state sequences and actions of every `split` demo of the files."""
    demos = []
    for path in paths:
        validate_file(path, obs_keys=list(keys))
        with h5py.File(path, "r", locking=False) as f:
            for name in list_demos(path, split):
                g = f["data"][name]
                obs = np.concatenate([np.asarray(g["obs"][k], np.float32).reshape(len(g["actions"]), -1)
                                      for k in keys], 1)
                last = np.concatenate([np.asarray(g["next_obs"][k][-1], np.float32).reshape(-1) for k in keys])
                demos.append(Demo(np.concatenate([obs, last[None]]), np.asarray(g["actions"], np.float32)))
    if not demos:
        raise DatasetError(f"no {split} demos in {list(paths)}")
    return demos


def model_config(cfg: StateTrainConfig, widths: dict[str, int], action_dim: int) -> StateModelConfig:
    """The state layout: where the object's pose lies, which dims are derived, which are quaternions."""
    task = object_task(cfg.task)
    if task is None:
        raise ValueError(f"task {cfg.task!r} has no object-state layout in hma_gym.tasks")
    offsets, start = {}, 0
    for k in cfg.keys:
        offsets[k] = start
        start += widths[k]
    if widths[OBJECT_KEY] != task.object_dim:
        raise DatasetError(f"{OBJECT_KEY!r} is {widths[OBJECT_KEY]} wide; {cfg.task} has {task.object_dim}")

    def obj(field: str) -> tuple[int, int]:
        o, w = task.field_offset(field)
        return offsets[OBJECT_KEY] + o, w

    pose = [i for f in task.pose_fields for i in range(obj(f)[0], sum(obj(f)))]
    pos_start, pos_width = obj(task.position_field)
    derived = []
    for target, a, b in task.differences:  # each name: an object field, or an observation key
        def where(name: str) -> int:
            return offsets[name] if name in offsets else obj(name)[0]
        derived.append((where(target), where(a), where(b), obj(target)[1]))
    quats = [offsets[k] for k in cfg.keys if k.endswith("_quat")]
    quats += [obj(f)[0] for f, w in task.fields if f.endswith("_quat") and w == 4]
    return StateModelConfig(keys=[(k, widths[k]) for k in cfg.keys], action_dim=action_dim, hidden=cfg.hidden,
                            layers=cfg.layers, grasp_steps=cfg.grasp_steps, object_pose=pose,
                            object_pos=list(range(pos_start, pos_start + pos_width)),
                            derived=derived, quaternions=quats)


def fit_statistics(model: StateModel, demos: list[Demo]) -> None:
    """State, change and action mean/std from the train demos; the object pose's changes over contact steps only."""
    states = torch.from_numpy(np.concatenate([d.states[:-1] for d in demos]))
    nxt = torch.from_numpy(np.concatenate([d.states[1:] for d in demos]))
    actions = torch.from_numpy(np.concatenate([d.actions for d in demos]))
    delta = nxt - states
    moving = model.contact_label(states, nxt)
    d_mean, d_std = delta.mean(0), delta.std(0)
    pose = model.pose_mask
    if moving.any():
        d_mean[pose], d_std[pose] = delta[moving][:, pose].mean(0), delta[moving][:, pose].std(0)
    model.state_mean.copy_(states.mean(0))
    model.state_std.copy_(states.std(0).clamp(min=1e-3))
    model.delta_mean.copy_(d_mean)
    model.delta_std.copy_(d_std.clamp(min=1e-5))
    model.action_mean.copy_(actions.mean(0))
    model.action_std.copy_(actions.std(0).clamp(min=1e-2))
    model.cfg.rest_height = float(np.median([d.states[:, model.cfg.object_pos[-1]].min() for d in demos]))


def window_sampler(demos: list[Demo], window: int, batch_size: int, start_every: int = 8):
    """batch_fn for train_loop: `batch_size` windows, each from a demo drawn by length, zero-padded past its end;
    the demos' grasp labels (`Demo.label_grasps`) come with them. Every `start_every`-th window starts at its
    episode's first step (drawn uniformly a step in ~100 would rarely be: the learned env starts every
    episode there, s_{t-1} = s_0 and no previous action)."""
    lengths = np.array([len(d.actions) for d in demos])
    probs = lengths / lengths.sum()
    S, A = demos[0].states.shape[1], demos[0].actions.shape[1]

    def batch(step: int, rng: np.random.Generator) -> dict:
        states = np.zeros((batch_size, window + 1, S), np.float32)
        actions = np.zeros((batch_size, window, A), np.float32)
        prev_s, prev_a = np.zeros((batch_size, S), np.float32), np.zeros((batch_size, A), np.float32)
        valid = np.zeros((batch_size, window), bool)
        grasp, weight = np.zeros((batch_size, window), np.float32), np.zeros((batch_size, window), np.float32)
        for i, j in enumerate(rng.choice(len(demos), batch_size, p=probs)):
            d = demos[j]
            # one window in `start_every` opens its episode (the reset, where the cube settles onto the table)
            t = 0 if i % start_every == 0 else int(rng.integers(len(d.actions)))
            k = min(window, len(d.actions) - t)
            states[i, : k + 1], actions[i, :k], valid[i, :k] = d.states[t : t + k + 1], d.actions[t : t + k], True
            grasp[i, :k], weight[i, :k] = d.grasp[t : t + k], d.grasp_weight[t : t + k]
            states[i, k + 1 :] = d.states[t + k]
            prev_s[i] = d.states[t - 1] if t > 0 else d.states[0]
            prev_a[i] = d.actions[t - 1] if t > 0 else 0.0
        return {k: torch.from_numpy(v) for k, v in
                dict(states=states, actions=actions, prev_state=prev_s, prev_action=prev_a, valid=valid,
                     grasp=grasp, grasp_weight=weight).items()}

    return batch


@torch.no_grad()
def replay(model: StateModel, demos: list[Demo]) -> tuple[np.ndarray, np.ndarray]:
    """Open-loop replay of every demo's actions from its first state: predicted states (n, L_max+1, S) (NaN past
    each demo's end) and the lengths."""
    device = model.state_mean.device
    n, L = len(demos), max(len(d.actions) for d in demos)
    S, A = demos[0].states.shape[1], demos[0].actions.shape[1]
    actions = np.zeros((n, L, A), np.float32)
    for i, d in enumerate(demos):
        actions[i, : len(d.actions)] = d.actions
    a_all = torch.from_numpy(actions).to(device)
    s = torch.from_numpy(np.stack([d.states[0] for d in demos])).to(device)
    s_prev, a_prev = s.clone(), torch.zeros(n, A, device=device)
    grasp, closed = torch.zeros(n, device=device), torch.zeros(n, device=device)
    out = np.full((n, L + 1, S), np.nan, np.float32)
    out[:, 0] = s.cpu().numpy()
    for t in range(L):
        nxt, grasp, closed, _, _ = model.step(s, s_prev, a_all[:, t], a_prev, grasp, closed)
        s_prev, s, a_prev = s, nxt, a_all[:, t]
        out[:, t + 1] = s.cpu().numpy()
    lengths = np.array([len(d.actions) for d in demos])
    for i, length in enumerate(lengths):
        out[i, length + 1 :] = np.nan
    return out, lengths


def verdict_metrics(model: StateModel, demos: list[Demo], task_name: str) -> dict[str, float]:
    """Open-loop verdict agreement with the recorded object state (success at any step of the episode)."""
    task = object_task(task_name)
    names = [k for k, _ in model.cfg.keys]
    o = sum(w for _, w in model.cfg.keys[: names.index(OBJECT_KEY)])
    obj, pos = slice(o, o + task.object_dim), model.cfg.object_pos
    pred, lengths = replay(model, demos)
    pred_success = np.array([task.success(p[: n + 1, obj]).any() for p, n in zip(pred, lengths, strict=True)])
    true_success = np.array([task.success(d.states[:, obj]).any() for d in demos])
    err = [np.linalg.norm(p[n, pos] - d.states[n, pos]) for p, d, n in zip(pred, demos, lengths, strict=True)]
    eef = [np.linalg.norm(p[n, :3] - d.states[n, :3]) for p, d, n in zip(pred, demos, lengths, strict=True)]
    return {"verdict_agreement": float((pred_success == true_success).mean()),
            "false_success": float((pred_success & ~true_success).mean()),
            "false_failure": float((~pred_success & true_success).mean()),
            "gt_success": float(true_success.mean()), "pred_success": float(pred_success.mean()),
            "final_object_pos_error": float(np.mean(err)), "final_first_key_error": float(np.mean(eef))}


def bank_object_states(cfg: StateTrainConfig, ckpt: Path) -> np.ndarray:
    """The object state of each start of `ckpt`'s reset bank: the first observations of `cfg.bank_data`'s train
    demos, checked to be those very starts (their proprio equals the bank's)."""
    env = load_json(ckpt / "config.json")["env"]
    bank = load_tensors(ckpt / "init_bank.safetensors")
    names = list_demos(cfg.bank_data, "train")[: len(bank[env["image_key"]])]
    with h5py.File(cfg.bank_data, "r", locking=False) as f:
        first = {k: np.stack([np.asarray(f["data"][n]["obs"][k][0], np.float32) for n in names])
                 for k in (OBJECT_KEY, *(k for k, _ in env["proprio"]))}
    for key, _ in env["proprio"]:
        if first[key].shape != tuple(bank[key].shape) or not np.allclose(first[key], bank[key].numpy(), atol=1e-5):
            raise CheckpointError(f"--bank-data {cfg.bank_data}: its first train observations are not {ckpt}'s "
                                  f"reset bank ({key!r} differs); pass the file the bank was made from")
    return first[OBJECT_KEY]


def attach(cfg: StateTrainConfig, model: StateModel, ckpt: Path, object_states: np.ndarray) -> None:
    """Put the trained model into the packed checkpoint `ckpt`, and the object state into its bank."""
    bank = load_tensors(ckpt / "init_bank.safetensors")
    bank[OBJECT_KEY] = torch.from_numpy(object_states)
    save_tensors(ckpt / "init_bank.safetensors", bank)
    save_tensors(ckpt / f"{STATE_MODEL_NAME}.safetensors", model.state_dict())  # float32: 0.6 MB
    config = load_json(ckpt / "config.json")
    config[STATE_MODEL_NAME] = {**model.cfg.to_dict(), "data": list(cfg.data), "trained_steps": cfg.steps}
    save_json(ckpt / "config.json", config)


def train_state(cfg: StateTrainConfig) -> dict:
    banks = {Path(c): bank_object_states(cfg, Path(c)) for c in cfg.into}  # refuse a wrong --bank-data up front
    train = load_demos(cfg.data, cfg.keys, "train")
    valid = load_demos(cfg.data, cfg.keys, "valid")
    with h5py.File(cfg.data[0], "r", locking=False) as f:
        name = list_demos(cfg.data[0], "train")[0]
        widths = {k: int(np.prod(f["data"][name]["obs"][k].shape[1:])) for k in cfg.keys}
    model = StateModel(model_config(cfg, widths, train[0].actions.shape[1]))
    for d in train:
        d.label_grasps(model.cfg)
    fit_statistics(model, train)
    rng = np.random.default_rng(cfg.seed)
    eval_demos = [valid[i] for i in sorted(rng.permutation(len(valid))[: cfg.eval_demos * len(cfg.data)])]
    out = Path(cfg.out)

    def export(m: StateModel, step: int) -> None:
        save_module(out, STATE_MODEL_NAME, m, {**m.cfg.to_dict(), "trained_steps": step, "data": list(cfg.data)})

    metrics = train_loop(
        cfg, model, window_sampler(train, cfg.window, cfg.batch_size),
        lambda m, b: rollout_loss(m, b["states"], b["actions"], b["prev_state"], b["prev_action"], b["valid"],
                                  b["grasp"], b["grasp_weight"]),
        lambda m: verdict_metrics(m, eval_demos, cfg.task), export, to_jsonable(cfg), desc="train-state")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for ckpt, object_states in banks.items():
        attach(cfg, model.cpu().eval(), ckpt, object_states)
    return metrics
