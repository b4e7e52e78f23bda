"""`hma-gym add-state`: a trained world model whose state gains low-dimensional keys (e.g. robomimic's `object`).

Model surgery for fine-tuning: the model of `--init` (a `train` run or a packed checkpoint) is copied into one
whose embodiment state is the old keys followed by `--proprio-keys`' new ones. The trunk, image head, action
stem and head keep their weights; the state stem keeps its weights for the old dims and reads the new ones
through zero-initialised weights (so the copy starts out predicting frames exactly as the source does); the
state head keeps its rows for the old dims and gets fresh ones for the new. Where a new key is the task's
object state (`hma_gym.tasks`), the value its success predicate compares (Lift: the cube's height) is also
binned (`EmbodimentSpec.state_bins`) with the success threshold as one edge, so generation commits to lifted
or not.

The normalisation statistics of every state and action dim are refitted on the data's train split, and the
change is folded into the first layers of the stems and the last layers of the heads, so the copy computes
the same function in world units. That matters when the new data is broader than the source's: statistics
fitted on expert motion give uniform random actions normalised values of ~20 (and random wrist rotations
~100 for the quaternion), far outside what the stems ever saw. The output is a run directory that
`hma-gym train --init OUT --proprio-keys ...` fine-tunes on data recorded with those keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from hma_gym.checkpoint import CheckpointError, load_tensors, save_module, save_tensors
from hma_gym.data.hdf5 import list_demos
from hma_gym.models.hma import HMA, EmbodimentSpec, HMAConfig
from hma_gym.tasks import OBJECT_KEY, object_task
from hma_gym.world_model import load_dynamics
from training.data import DataConfig


@dataclass
class AddStateConfig(DataConfig):
    """Copy a trained world model into one whose state has more keys, ready to fine-tune."""

    init: str = ""
    """A `train` run directory or a packed checkpoint (e.g. hma_gym/assets/lift) whose model gains state."""
    out: str = "runs/add_state"
    """Run directory to write (dynamics.safetensors, dynamics.json, normalization.safetensors)."""
    embodiment: str = "panda_osc_pose"
    """The embodiment whose state grows."""
    task: str = "Lift"
    """robosuite task of the data: its object-state success predicate decides which value is binned."""
    min_std: float = 1e-2
    """Floor of the new dims' std (as `train` floors its statistics)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.init:
            raise ValueError("--init is required: the run or checkpoint whose model gains state")


def source_keys(init: Path, meta: dict) -> list[str]:
    """The low-dimensional keys, in order, of the state of the model in `init`."""
    if meta.get("packed"):
        return [k for k, _ in json.loads((init / "config.json").read_text())["env"]["proprio"]]
    return list(meta["proprio_keys"])


def statistics(cfg: AddStateConfig, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                dict[str, int]]:
    """Per-dim mean and (floored) std of the state (`keys`, concatenated) and of the actions, over the train
    demos of the data files, and each key's width: (state_mean, state_std, action_mean, action_std, widths)."""
    states, actions, widths = [], [], {}
    for path in (cfg.data, *cfg.extra_data):
        with h5py.File(path, "r", locking=False) as f:
            for name in list_demos(path, "train"):
                demo = f["data"][name]
                obs = demo["obs"]
                missing = [cfg.key_map.get(k, k) for k in keys if cfg.key_map.get(k, k) not in obs]
                if missing:
                    raise CheckpointError(f"{path}: {name} has no observation {missing} (collect records "
                                          f"'{OBJECT_KEY}' since issue 25)")
                parts = [np.asarray(obs[cfg.key_map.get(k, k)], np.float64) for k in keys]
                parts = [p.reshape(len(p), -1) for p in parts]
                widths = {k: p.shape[1] for k, p in zip(keys, parts, strict=True)}
                states.append(np.concatenate(parts, axis=1))
                actions.append(np.asarray(demo["actions"], np.float64))
    if not states:
        raise CheckpointError(f"no train demos in {[cfg.data, *cfg.extra_data]}")
    s, a = np.concatenate(states), np.concatenate(actions)
    return s.mean(0), np.maximum(s.std(0), cfg.min_std), a.mean(0), np.maximum(a.std(0), cfg.min_std), widths


@torch.no_grad()
def restandardise_input(layer: torch.nn.Linear, old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, ...]):
    """A layer reading inputs normalised with `old` (mean, std) reads ones normalised with `new` instead and
    computes the same: x_old = (x_new * s_new + m_new - m_old) / s_old. Only the first len(old) inputs."""
    (m_old, s_old), (m_new, s_new) = old, (new[0][: len(old[0])], new[1][: len(old[0])])
    n = len(m_old)
    w = layer.weight[:, :n].double()
    layer.bias += (w @ torch.from_numpy((m_new - m_old) / s_old)).to(layer.bias.dtype)
    layer.weight[:, :n] = (w * torch.from_numpy(s_new / s_old)).to(layer.weight.dtype)


@torch.no_grad()
def restandardise_output(layer: torch.nn.Linear, old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, ...]):
    """A layer predicting values normalised with `old` predicts them normalised with `new` instead: y_new =
    (y_old * s_old + m_old - m_new) / s_new. Only the first len(old) outputs."""
    (m_old, s_old), (m_new, s_new) = old, (new[0][: len(old[0])], new[1][: len(old[0])])
    n = len(m_old)
    scale = torch.from_numpy(s_old / s_new)
    layer.weight[:n] = (layer.weight[:n].double() * scale[:, None]).to(layer.weight.dtype)
    layer.bias[:n] = (layer.bias[:n].double() * scale + torch.from_numpy((m_old - m_new) / s_new)).to(
        layer.bias.dtype)


def add_state(cfg: AddStateConfig) -> dict:
    init = Path(cfg.init)
    source, meta = load_dynamics(init)
    old_keys = source_keys(init, meta)
    new_keys = list(cfg.proprio_keys)
    if new_keys[: len(old_keys)] != old_keys or len(new_keys) == len(old_keys):
        raise ValueError(f"--proprio-keys must be {cfg.init}'s keys {old_keys} followed by the new ones. "
                         f"Got {new_keys}")
    added = new_keys[len(old_keys):]
    norm = load_tensors(init / "normalization.safetensors")
    prefix = f"{cfg.embodiment}/" if f"{cfg.embodiment}/state_mean" in norm else ""
    spec = source.config.embodiments.get(cfg.embodiment)
    if spec is None:
        raise CheckpointError(f"{cfg.init} has no embodiment {cfg.embodiment!r} ({source.embodiment_names})")
    state_mean, state_std, action_mean, action_std, widths = statistics(cfg, new_keys)
    old_dim = spec.state_dim
    old_state = (norm[f"{prefix}state_mean"].double().numpy(), norm[f"{prefix}state_std"].double().numpy())
    old_action = (norm[f"{prefix}action_mean"].double().numpy(), norm[f"{prefix}action_std"].double().numpy())

    # the value the task's success predicate thresholds is also predicted as an interval
    bins, task = [], object_task(cfg.task)
    if task is not None and OBJECT_KEY in added:
        field_offset, field_dim = task.field_offset(task.verdict_field)
        i = old_dim + sum(widths[k] for k in added[: added.index(OBJECT_KEY)]) + field_offset + task.verdict_index
        edges = (np.asarray(task.verdict_edges) - state_mean[i]) / state_std[i]
        bins.append((int(i), tuple(float(e) for e in edges)))
    specs = dict(source.config.embodiments)
    specs[cfg.embodiment] = EmbodimentSpec(spec.action_dim, len(state_mean), state_bins=tuple(bins))
    config = HMAConfig.from_dict({**source.config.to_dict(), "embodiments": {k: vars(v) for k, v in specs.items()}})
    torch.manual_seed(0)
    model = HMA(config)
    weights = source.state_dict()
    grown = {}
    for name, tensor in model.state_dict().items():
        if name not in weights or weights[name].shape == tensor.shape:
            continue
        old = weights.pop(name)
        if name.endswith("state_stem.weight"):  # (D, S): the new inputs start unread
            grown[name] = torch.cat([old, torch.zeros(old.shape[0], tensor.shape[1] - old.shape[1])], dim=1)
        else:  # the state head's last layer (S, D) / (S,): old rows kept, new rows as initialised
            new = tensor.clone()
            new[: old.shape[0]] = old
            grown[name] = new
    missing, unexpected = model.load_state_dict({**weights, **grown}, strict=False)
    fresh = [k for k in missing if ".bin_heads." not in k]
    if fresh or unexpected:
        raise CheckpointError(f"add-state could not copy {cfg.init}: missing {fresh}, unexpected {unexpected}")
    mods = model.embodiments[cfg.embodiment]
    restandardise_input(mods.state_stem, old_state, (state_mean, state_std))
    restandardise_output(mods.state_head.proj, old_state, (state_mean, state_std))
    for layer in (mods.action_stem.to_tokens.fc, mods.action_stem.to_cond.fc):
        restandardise_input(layer, old_action, (action_mean, action_std))
    restandardise_output(mods.action_head.proj, old_action, (action_mean, action_std))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"init": cfg.init, "added_keys": added, "state_dim": [old_dim, len(state_mean)],
              "grown": sorted(grown), "state_bins": [list(b) for b in bins]}
    run_meta = {"hma": config.to_dict(), "trained_steps": meta.get("trained_steps"), "image_key": cfg.image_key,
                "proprio_keys": new_keys, "embodiment": cfg.embodiment, "action_stride": cfg.action_stride,
                "data": cfg.data, "add_state": report}
    save_module(out, "dynamics", model, run_meta)
    norm_out = dict(norm)
    for name, value in (("state_mean", state_mean), ("state_std", state_std), ("action_mean", action_mean),
                        ("action_std", action_std)):
        norm_out[f"{prefix}{name}"] = torch.from_numpy(np.asarray(value, np.float32))
    save_tensors(out / "normalization.safetensors", norm_out)
    print(json.dumps(report, indent=2))
    return report

