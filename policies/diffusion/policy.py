"""`DiffusionPolicy`: the batched policy protocol (`act`, `reset`) around a `DiffusionModel`, plus save/load.

A checkpoint is a directory:

| file | contents |
|---|---|
| `policy.json` | `format_version`, `type` ("diffusion_policy"), `config` (DiffusionPolicyConfig), `info` (provenance) |
| `policy.safetensors` | the model's state dict, fitted normaliser buffers included |

Loading never unpickles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hma_gym.checkpoint import FORMAT_VERSION, CheckpointError, load_json, load_module_weights, save_json, save_tensors
from hma_gym.config import to_jsonable
from policies.base import batch_size_of
from policies.diffusion.config import DiffusionPolicyConfig
from policies.diffusion.model import DiffusionModel

POLICY_TYPE = "diffusion_policy"
WEIGHTS_FILE = "policy.safetensors"
CONFIG_FILE = "policy.json"


def save_policy(directory: str | os.PathLike, model: torch.nn.Module, config: DiffusionPolicyConfig,
                info: dict | None = None) -> Path:
    """Write a policy directory from a bare `DiffusionModel` (the trainer exports this way, without moving it)."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_FILE, model.state_dict())
    save_json(directory / CONFIG_FILE, {"format_version": FORMAT_VERSION, "type": POLICY_TYPE,
                                        "config": config.to_dict(), "info": to_jsonable(info or {})})
    return directory


class DiffusionPolicy:
    """A Diffusion Policy acting on a batch of envs.

    Per env it keeps the last `n_obs_steps` observations (the first observation of an episode fills the
    whole history) and a queue of planned actions. `act(obs)` appends `obs` to every env's history; the
    envs whose queue is empty get a new chunk from one batched sampling call, of which actions
    `n_obs_steps - 1 .. n_obs_steps - 2 + n_action_steps` are queued. Sampling noise comes from the policy's
    own `torch.Generator` seeded with `seed`: same seed and observations, same actions.

    A batch of another size than the previous call's starts every env afresh (as after `reset()`).
    """

    def __init__(self, config: DiffusionPolicyConfig, device: str | torch.device = "cpu", seed: int = 0,
                 model: DiffusionModel | None = None):
        self.config = config
        self.device = torch.device(device)
        self.model = (model if model is not None else DiffusionModel(config)).to(self.device).eval()
        self.set_seed(seed)
        self._n_envs = 0

    # ------------------------------------------------------------------ protocol
    def set_seed(self, seed: int) -> None:
        """Restart the sampling noise stream."""
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        """Forget the history and the queued actions of `env_ids` (all envs when None)."""
        if self._n_envs == 0:
            return
        ids = np.arange(self._n_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64)
        self._fresh[ids] = True
        self._cursor[ids] = self.config.n_action_steps

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Observation dict with a leading env dim -> actions (n_envs, action_dim) float32 in [-1, 1]."""
        cfg = self.config
        n = batch_size_of(obs)
        if n != self._n_envs:
            self._allocate(n)
        image, proprio = self._read(obs)  # (n, H, W, 3) uint8, (n, P) float32
        # history: shift the old envs, fill a fresh env's whole history with its first observation
        old = ~self._fresh
        self._images[old] = np.roll(self._images[old], -1, axis=1)
        self._proprio[old] = np.roll(self._proprio[old], -1, axis=1)
        self._images[old, -1], self._proprio[old, -1] = image[old], proprio[old]
        self._images[self._fresh] = image[self._fresh, None]
        self._proprio[self._fresh] = proprio[self._fresh, None]
        self._fresh[:] = False

        need = np.flatnonzero(self._cursor >= cfg.n_action_steps)
        if len(need):
            images = torch.from_numpy(self._images[need]).to(self.device)  # (k, To, H, W, 3)
            prop = torch.from_numpy(self._proprio[need]).to(self.device)  # (k, To, P)
            chunk = self.model.sample(images, prop, generator=self.generator)  # (k, horizon, A)
            start = cfg.n_obs_steps - 1
            self._plan[need] = chunk[:, start : start + cfg.n_action_steps].float().cpu().numpy()
            self._cursor[need] = 0
        actions = self._plan[np.arange(n), self._cursor].copy()  # (n, A)
        self._cursor += 1
        return actions

    def _allocate(self, n: int) -> None:
        cfg = self.config
        self._n_envs = n
        self._images = np.zeros((n, cfg.n_obs_steps, cfg.image_size, cfg.image_size, 3), np.uint8)
        self._proprio = np.zeros((n, cfg.n_obs_steps, cfg.proprio_dim), np.float32)
        self._plan = np.zeros((n, cfg.n_action_steps, cfg.action_dim), np.float32)
        self._cursor = np.full(n, cfg.n_action_steps, np.int64)  # n_action_steps = queue empty
        self._fresh = np.ones(n, bool)

    def _read(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        missing = [k for k in cfg.obs_keys if k not in obs]
        if missing:
            raise ValueError(f"observation lacks {missing} (the policy reads {list(cfg.obs_keys)}; got {sorted(obs)})")
        image = np.asarray(obs[cfg.image_key])
        want = (cfg.image_size, cfg.image_size, 3)
        if image.shape[1:] != want or image.dtype != np.uint8:
            raise ValueError(f"{cfg.image_key} must be uint8 (n_envs, {want[0]}, {want[1]}, 3) for this policy. "
                             f"Got {image.dtype} {image.shape}")
        proprio = np.concatenate([np.asarray(obs[k], np.float32).reshape(len(image), -1) for k in cfg.proprio_keys],
                                 axis=1)
        if proprio.shape[1] != cfg.proprio_dim:
            raise ValueError(f"{list(cfg.proprio_keys)} hold {proprio.shape[1]} values per env; the policy was built "
                             f"for proprio_dim={cfg.proprio_dim}")
        return image, proprio

    # ------------------------------------------------------------------ save / load
    def num_params(self) -> int:
        return self.model.num_params()

    def save(self, directory: str | os.PathLike, info: dict | None = None) -> Path:
        """Write `policy.safetensors` + `policy.json` into `directory`; returns it."""
        return save_policy(directory, self.model, self.config, info)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0) -> DiffusionPolicy:
        """Build a policy from a directory written by `save`; errors (CheckpointError) name the file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"policy directory {directory} does not exist")
        meta_path = directory / CONFIG_FILE
        meta = load_json(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')!r}, this hma-gym reads "
                                  f"{FORMAT_VERSION}")
        if meta.get("type") != POLICY_TYPE:
            raise CheckpointError(f"{meta_path}: type {meta.get('type')!r}, expected {POLICY_TYPE!r}")
        try:
            config = DiffusionPolicyConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: bad policy config ({e})") from e
        model = DiffusionModel(config)
        load_module_weights(model, directory / WEIGHTS_FILE)
        return cls(config, device=device, seed=seed, model=model)
