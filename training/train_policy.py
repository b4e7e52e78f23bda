"""`hma-gym train-policy`: train a Diffusion Policy on a robomimic HDF5 file.

Data come through robomimic's own `SequenceDataset` (so every file robomimic reads trains a policy; files
without MuJoCo `states`, e.g. synthetic ones, are fine: states are never read). One dataset item is the
window around a time step t: observations t-n_obs_steps+1 .. t and the `horizon` actions that start at
the first of them (robomimic's `frame_stack=n_obs_steps`, `seq_length=horizon-n_obs_steps+1`; the start of
a demo is padded by repeating its first step, the end by repeating its last, as diffusion_policy does).

Batches are drawn in `batch_fn` from the numpy generator the shared loop passes (indices, crop corners,
diffusion noise and steps), so an interrupted run resumes exactly. The fitted normaliser (min-max to
[-1, 1]) is part of the policy's state dict. An EMA of the weights (diffusion_policy's schedule) is what
gets exported.

Writes to `out/`: `policy.safetensors` + `policy.json` (a loadable policy directory, every `save_every`
steps and at the end), `iter_{step}/` (the same, at each of `save_at`), `log.jsonl`, `train_state.pt`,
`metrics.json`.

CPU defaults: ~5M parameters (4.4M in the U-Net), batch 64, 2,000 steps at lr 3e-4 (diffusion_policy uses
1e-4 for hundreds of epochs on a GPU; a short CPU budget wants a higher rate).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hma_gym.checkpoint import save_json
from hma_gym.config import to_jsonable
from hma_gym.data.hdf5 import DatasetError, open_for_reading, validate_file
from policies.diffusion.config import DiffusionPolicyArch, DiffusionPolicyConfig
from training.loop import LoopConfig, check_finite_weights, train_loop


@dataclass
class PolicyTrainConfig(LoopConfig, DiffusionPolicyArch):
    """Train a Diffusion Policy (CNN U-Net, image + proprio history -> action chunks) on a robomimic file."""

    out: str = "runs/dp"
    """Run directory (policy.safetensors, policy.json, iter_*/, log.jsonl, train_state.pt)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 64
    """Windows per step."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine decay)."""
    weight_decay: float = 1e-6
    """AdamW weight decay (diffusion_policy's value)."""
    eval_every: int = 250
    """Held-out evaluation (denoising loss, sampled-action MSE on mask/valid) every n steps (and at the end)."""
    data: str = "data/lift.hdf5"
    """robomimic-layout HDF5 file."""
    filter_key: str = "train"
    """Train on the demos of this mask (mask/<filter_key>); empty = every demo of the file."""
    valid_key: str = "valid"
    """Evaluate on the demos of this mask; empty or absent in the file = no held-out evaluation."""
    max_demos: int = 0
    """Train on the first n demos of the filter key only (0 = all), for data-amount ablations."""
    save_at: tuple[int, ...] = ()
    """Also write a full policy directory out/iter_{step}/ after each of these steps."""
    ema: bool = True
    """Export an exponential moving average of the weights (diffusion_policy's schedule: --ema-power,
    --ema-max-decay)."""
    eval_samples: int = 64
    """Held-out windows of the evaluation (fixed across evaluations)."""
    extra_data: tuple[str, ...] = ()
    """More robomimic files (e.g. synthetic ones from `hma-gym synthesize`) whose demos join the training set."""
    extra_filter_key: str = ""
    """Demos of each extra file to use (mask/<key>); empty = every demo of the file."""
    extra_max_demos: int = 0
    """Use the first n demos (of the extra filter key) of each extra file only (0 = all)."""

    def __post_init__(self):
        LoopConfig.__post_init__(self)
        self.save_at = tuple(int(s) for s in self.save_at)
        self.proprio_keys = tuple(self.proprio_keys)
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        self.down_dims = tuple(int(d) for d in self.down_dims)
        self.extra_data = tuple(str(p) for p in self.extra_data)
        if self.max_demos < 0 or self.extra_max_demos < 0:
            raise ValueError(f"max_demos and extra_max_demos must be >= 0 (0 = all). "
                             f"Got {self.max_demos=}, {self.extra_max_demos=}")
        bad = [s for s in self.save_at if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"save_at steps must be in 1..steps={self.steps}. Got save_at={self.save_at}")
        if self.eval_samples <= 0:
            raise ValueError(f"eval_samples must be positive. Got {self.eval_samples=}")
        # the policy's own checks, with the data-dependent sizes stubbed (checked again on the data)
        self.policy_config(image_size=self.crop_size, proprio_dim=len(self.proprio_keys), action_dim=1)

    def policy_config(self, image_size: int, proprio_dim: int, action_dim: int) -> DiffusionPolicyConfig:
        shared = {f.name: getattr(self, f.name) for f in fields(DiffusionPolicyConfig) if hasattr(self, f.name)}
        shared.update(image_size=image_size, proprio_dim=proprio_dim, action_dim=action_dim)
        return DiffusionPolicyConfig(**shared)


# ----------------------------------------------------------------------------- data


@functools.cache
def _windows_class() -> type:
    """`SequenceDataset` with two changes, made in a subclass (robomimic is imported only when training).

    - `max_demos`: robomimic 0.3.0 selects demos only by filter key, so `load_demo_info` is overridden
      to keep the first n demos (in index order) of the key; no temporary filter key is written.
    - images cached once: `hdf5_cache_mode="low_dim"` re-reads (and lzf-decompresses) every image from
      the file on every `__getitem__`, and `"all"` pre-computes every window (horizon x images per time
      step: ~3 GB for 200 Lift demos), so this class caches the raw per-demo arrays of every key
      (~160 MB for the same file) and reads windows from them.
    - the file is opened without HDF5's lock (`open_for_reading`), so a collection appending to it meanwhile
      is not blocked.
    """
    from robomimic.utils.dataset import SequenceDataset

    class RobomimicWindows(SequenceDataset):
        def __init__(self, *args, max_demos: int = 0, **kwargs):
            self.max_demos = max_demos
            super().__init__(*args, **kwargs)

        def load_demo_info(self, filter_by_attribute=None, demos=None):
            if demos is None and self.max_demos > 0:
                if filter_by_attribute is not None:
                    names = [n.decode() for n in self.hdf5_file[f"mask/{filter_by_attribute}"][:]]
                else:
                    names = list(self.hdf5_file["data"].keys())
                demos = sorted(names, key=lambda n: int(n[5:]))[: self.max_demos]
            super().load_demo_info(filter_by_attribute=filter_by_attribute, demos=demos)

        @property
        def hdf5_file(self):
            if self._hdf5_file is None:
                self._hdf5_file = open_for_reading(self.hdf5_path)
            return self._hdf5_file

        def load_dataset_in_memory(self, demo_list, hdf5_file, obs_keys, dataset_keys, load_next_obs):
            self.obs_keys_in_memory = list(self.obs_keys)
            return super().load_dataset_in_memory(demo_list, hdf5_file, self.obs_keys, dataset_keys, load_next_obs)

    return RobomimicWindows


def open_windows(path: str | os.PathLike, cfg: PolicyTrainConfig, filter_key: str | None, max_demos: int = 0):
    """robomimic `SequenceDataset` of (obs history, action chunk) windows of the demos under `filter_key`."""
    import robomimic.utils.obs_utils as ObsUtils

    ObsUtils.initialize_obs_utils_with_obs_specs(
        {"obs": {"low_dim": list(cfg.proprio_keys), "rgb": [cfg.image_key]}}
    )
    return _windows_class()(
        hdf5_path=os.fspath(path), obs_keys=[cfg.image_key, *cfg.proprio_keys], dataset_keys=["actions"],
        frame_stack=cfg.n_obs_steps, seq_length=cfg.horizon - cfg.n_obs_steps + 1, pad_frame_stack=True,
        pad_seq_length=True, hdf5_cache_mode="low_dim", filter_by_attribute=filter_key, load_next_obs=False,
        max_demos=max_demos,
    )


def as_uint8_hwc(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 as stored; undoes robomimic's `process_obs` (float (..., 3, H, W) in [0, 1]) if applied."""
    if images.dtype == np.uint8:
        return images
    if images.shape[-3] == 3 and images.shape[-1] != 3:
        images = np.moveaxis(images, -3, -1)
    return np.clip(np.rint(images * 255.0 if images.max() <= 1.0 else images), 0, 255).astype(np.uint8)


def split_window(item: dict, cfg: PolicyTrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One dataset item -> images (To, H, W, 3) uint8, proprio (To, P), actions (horizon, A)."""
    to = cfg.n_obs_steps
    obs = item["obs"]
    images = as_uint8_hwc(np.asarray(obs[cfg.image_key][:to]))
    proprio = np.concatenate([np.asarray(obs[k][:to], np.float32).reshape(to, -1) for k in cfg.proprio_keys], -1)
    return images, proprio, np.asarray(item["actions"][: cfg.horizon], np.float32)


def collate(ds, indices: np.ndarray, cfg: PolicyTrainConfig) -> dict[str, torch.Tensor]:
    parts = [split_window(ds[int(i)], cfg) for i in indices]
    return {
        "images": torch.from_numpy(np.stack([p[0] for p in parts])),  # (B, To, H, W, 3) uint8
        "proprio": torch.from_numpy(np.stack([p[1] for p in parts])),  # (B, To, P)
        "actions": torch.from_numpy(np.stack([p[2] for p in parts])),  # (B, horizon, A)
    }


def demo_arrays(ds, cfg: PolicyTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every (proprio, action) row of the dataset's demos, from robomimic's in-memory cache (a
    `ConcatDataset` of several files: every part's rows)."""
    parts = getattr(ds, "datasets", [ds])
    proprio = np.concatenate([np.concatenate([np.asarray(d.hdf5_cache[ep]["obs"][k], np.float32).reshape(
        int(d.hdf5_cache[ep]["attrs"]["num_samples"]), -1) for k in cfg.proprio_keys], -1)
        for d in parts for ep in d.demos])
    actions = np.concatenate([np.asarray(d.hdf5_cache[ep]["actions"], np.float32) for d in parts for ep in d.demos])
    return proprio, actions


def count_demos(ds) -> int:
    return sum(d.n_demos for d in getattr(ds, "datasets", [ds]))


def has_demos(path: str | os.PathLike, key: str) -> bool:
    with open_for_reading(path) as f:
        return bool(key) and f"mask/{key}" in f and len(f[f"mask/{key}"]) > 0


# ----------------------------------------------------------------------------- training


def train_policy(cfg: PolicyTrainConfig) -> dict:
    """Train (or resume) a Diffusion Policy; returns a summary (also printed as JSON and saved as metrics.json)."""
    from policies.diffusion.model import DiffusionModel
    from policies.diffusion.policy import save_policy

    for path in (cfg.data, *cfg.extra_data):  # states are never read: synthetic files train too
        validate_file(path, require_states=False, image_key=cfg.image_key, obs_keys=cfg.proprio_keys)
    filter_key = cfg.filter_key or None
    if filter_key is not None and not has_demos(cfg.data, filter_key):
        raise DatasetError(f"{cfg.data}: no demos under mask/{filter_key} (--filter-key)")
    train = open_windows(cfg.data, cfg, filter_key, cfg.max_demos)
    extra_key = cfg.extra_filter_key or None
    extras = []
    for path in cfg.extra_data:
        if extra_key is not None and not has_demos(path, extra_key):
            raise DatasetError(f"{path}: no demos under mask/{extra_key} (--extra-filter-key)")
        extras.append(open_windows(path, cfg, extra_key, cfg.extra_max_demos))
    if extras:
        shapes = {tuple(np.shape(d[0]["obs"][cfg.image_key])) for d in [train, *extras]}
        if len(shapes) > 1:
            raise DatasetError(f"--data and --extra-data images differ in shape: {sorted(shapes)}")
        train = torch.utils.data.ConcatDataset([train, *extras])
    valid = open_windows(cfg.data, cfg, cfg.valid_key) if cfg.valid_key and has_demos(cfg.data, cfg.valid_key) \
        else None

    images, proprio, actions = split_window(train[0], cfg)
    if images.shape[1] != images.shape[2]:
        raise DatasetError(f"{cfg.data}: {cfg.image_key} is {images.shape[1]}x{images.shape[2]}; square images only")
    if cfg.crop_size > images.shape[1]:
        raise ValueError(f"crop_size must be <= the file's image size {images.shape[1]}. Got {cfg.crop_size=}")
    policy_cfg = cfg.policy_config(image_size=images.shape[1], proprio_dim=proprio.shape[1],
                                   action_dim=actions.shape[1])

    torch.manual_seed(cfg.seed)
    model = DiffusionModel(policy_cfg)
    all_proprio, all_actions = demo_arrays(train, cfg)
    model.normalizer.proprio.fit(torch.from_numpy(all_proprio))
    model.normalizer.action.fit(torch.from_numpy(all_actions))
    out = Path(cfg.out)
    is_main = int(os.environ.get("RANK", "0")) == 0
    info = {"data": str(cfg.data), "filter_key": cfg.filter_key, "max_demos": cfg.max_demos,
            "train_demos": count_demos(train), "train_windows": len(train), "ema": cfg.ema}
    if extras:
        info.update(extra_data=list(cfg.extra_data), extra_filter_key=cfg.extra_filter_key,
                    extra_max_demos=cfg.extra_max_demos, extra_demos=[d.n_demos for d in extras])
    span = policy_cfg.image_size - policy_cfg.crop_size + 1

    def on_step(m: nn.Module, step: int) -> None:
        """The save_at exports (of the EMA model when --ema is on, as every export)."""
        if is_main and step in cfg.save_at:
            check_finite_weights(m, f"policy at step {step}")
            save_policy(out / f"iter_{step}", m, policy_cfg, {**info, "step": step})

    def batch_fn(step: int, rng: np.random.Generator) -> dict:
        batch = collate(train, rng.integers(0, len(train), cfg.batch_size), cfg)
        b = cfg.batch_size
        batch["crop"] = torch.from_numpy(rng.integers(0, span, (b, 2)))
        batch["noise"] = torch.from_numpy(rng.standard_normal((b, policy_cfg.horizon, policy_cfg.action_dim))
                                          .astype(np.float32))
        batch["timesteps"] = torch.from_numpy(rng.integers(0, policy_cfg.num_train_timesteps, b))
        return batch

    def loss_fn(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = net(batch)
        return loss, {"loss": loss}

    eval_fn = None
    if valid is not None:
        eval_rng = np.random.default_rng(12345)
        eval_batch = collate(valid, eval_rng.choice(len(valid), min(cfg.eval_samples, len(valid)), replace=False), cfg)
        n_eval = len(eval_batch["actions"])
        eval_batch["crop"] = torch.full((n_eval, 2), (policy_cfg.image_size - policy_cfg.crop_size) // 2)
        eval_batch["noise"] = torch.from_numpy(eval_rng.standard_normal(eval_batch["actions"].shape).astype(np.float32))
        eval_batch["timesteps"] = torch.from_numpy(eval_rng.integers(0, policy_cfg.num_train_timesteps, n_eval))

        def eval_fn(m: nn.Module) -> dict:
            net = m
            device = next(net.parameters()).device
            batch = {k: v.to(device) for k, v in eval_batch.items()}
            gen = torch.Generator(device=device).manual_seed(0)
            chunk = net.sample(batch["images"], batch["proprio"], generator=gen)  # (B, horizon, A)
            lo, hi = policy_cfg.n_obs_steps - 1, policy_cfg.n_obs_steps - 1 + policy_cfg.n_action_steps
            return {"valid_loss": net(batch),
                    "valid_action_mse": (chunk[:, lo:hi] - batch["actions"][:, lo:hi]).pow(2).mean()}

    def export_fn(m: nn.Module, step: int) -> None:
        save_policy(out, m, policy_cfg, {**info, "step": step})

    run_config = {**to_jsonable(cfg), "policy": policy_cfg.to_dict(), "policy_params": model.num_params(), **info}
    t0 = time.perf_counter()
    last = train_loop(cfg, model, batch_fn, loss_fn, eval_fn, export_fn, run_config, desc="policy", on_step=on_step)
    result = {**last, "params": model.num_params(), "train_demos": count_demos(train),
              "train_windows": len(train), "wall_s": time.perf_counter() - t0, "out": str(out)}
    if is_main:
        save_json(out / "metrics.json", to_jsonable(result))
        print(json.dumps(to_jsonable(result), indent=2))
    return result
