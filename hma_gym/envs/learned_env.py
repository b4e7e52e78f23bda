"""The learned simulator: an HMA world model behind the Gymnasium API (single and natively batched)."""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from hma_gym.checkpoint import CheckpointError, check_finite, load_json, load_tensors, max_generation_steps
from hma_gym.envs.robosuite_env import RobosuiteEnv, check_reset_options
from hma_gym.tasks import OBJECT_KEY, object_task
from hma_gym.world_model import WorldModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"


class UnverifiedVerdictWarning(UserWarning):
    """A learned env whose success verdict is known not to fail bad policies (no object-state prediction)."""

VARIANTS = {"maskgit": "lift", "mar": "lift_mar", "fast": "lift_fast", "fsq15k": "lift_15k"}
# A start's low-dimensional values must lie within this many state std of the checkpoint's state mean: far
# beyond any real start (the shipped banks lie within 3; training floors std at 0.01, so every unit quaternion
# passes), near enough to refuse the absurd values (1e30) that turn the model's keys and values into NaN.
START_STD_LIMIT = 200.0
_IMPORTED_IN = os.getpid()  # a forked child inherits it: see _LearnedSim.__init__


def default_checkpoint(variant: str = "maskgit") -> Path:
    """The Lift checkpoint shipped inside the package."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}. Got {variant=}")
    path = ASSETS / VARIANTS[variant]
    if not path.is_dir():
        raise CheckpointError(f"no {variant} checkpoint ships with this version of hma-gym ({path} is missing): "
                              f"train one (hma-gym train ..., then hma-gym pack; the README gives each variant's "
                              f"recipe) and pass checkpoint=PATH")
    return path


def env_spaces(env_config: dict) -> tuple[spaces.Dict, spaces.Box]:
    """Observation and action spaces described by a checkpoint's `env` section (same as the GT env's)."""
    size = int(env_config["image_size"])
    obs = {env_config["image_key"]: spaces.Box(0, 255, shape=(size, size, 3), dtype=np.uint8)}
    for key, dim in env_config["proprio"]:
        obs[key] = spaces.Box(-np.inf, np.inf, shape=(int(dim),), dtype=np.float32)
    action = spaces.Box(-1.0, 1.0, shape=(int(env_config["action_dim"]),), dtype=np.float32)
    return spaces.Dict(obs), action


def checkpoint_state_keys(config: dict) -> list[tuple[str, int]]:
    """(key, width) of the low-dimensional observations a checkpoint's learned env predicts, in order: its state
    model's (proprio + object state) where it has one, else the world model's own proprio."""
    keys = config.get("state_model", {}).get("keys") or config["env"]["proprio"]
    return [(str(k), int(d)) for k, d in keys]


def model_spaces(config: dict) -> tuple[spaces.Dict, spaces.Box]:
    """A checkpoint's whole observation (image + every low-dimensional key it predicts) and action spaces."""
    model_space, action_space = env_spaces(config["env"])
    for key, dim in checkpoint_state_keys(config):
        if key not in model_space.spaces:
            model_space.spaces[key] = spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
    return model_space, action_space


def predicted_keys(checkpoint: str | os.PathLike | None = None, variant: str = "maskgit") -> tuple[str, ...]:
    """Every observation key a checkpoint's learned env can return (`obs_keys=` for all of them, robomimic's
    `object` included), read from its config.json without loading the model."""
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint(variant)
    return tuple(model_spaces(load_json(path / "config.json"))[0].spaces)


def space_difference(a: gym.Space, b: gym.Space, name: str = "") -> str | None:
    """A readable description of how two spaces differ, or None when they are equal."""
    if isinstance(a, spaces.Dict) and isinstance(b, spaces.Dict):
        if set(a.spaces) != set(b.spaces):
            return f"{name or 'observation'} keys {sorted(a.spaces)} vs {sorted(b.spaces)}"
        for key in a.spaces:
            diff = space_difference(a[key], b[key], key)
            if diff:
                return diff
        return None
    if isinstance(a, spaces.Box) and isinstance(b, spaces.Box):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name or 'space'}: shape {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if not (np.array_equal(a.low, b.low) and np.array_equal(a.high, b.high)):
            return f"{name or 'space'}: bounds differ"
        return None
    return None if a == b else f"{name or 'space'}: {a} vs {b}"


def check_paired(gt_env: gym.Env, learned_env: gym.Env) -> None:
    """Raise ValueError naming the difference if two envs cannot be run as a pair."""
    for what in ("observation_space", "action_space"):
        a = getattr(gt_env, "single_" + what, getattr(gt_env, what))
        b = getattr(learned_env, "single_" + what, getattr(learned_env, what))
        diff = space_difference(a, b, what.split("_")[0])
        if diff:
            raise ValueError(f"GT and learned envs do not pair: {diff}")


class _LearnedSim:
    """Batched state shared by the single and the vector learned env: n episodes, one model call per step."""

    def __init__(self, checkpoint: str | os.PathLike | None, n: int, steps: int | None, temperature: float | None,
                 greedy: bool | None, device: str, variant: str = "maskgit", success_frames: int | None = None,
                 success_threshold: float | None = None, compile: bool = False,
                 diffusion_steps: int | None = None, obs_keys: tuple[str, ...] | None = None,
                 uncertainty_limit: float | None = None, end_unjudged: bool = False):
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint(variant)
        self.checkpoint = path
        if os.getpid() != _IMPORTED_IN:
            # a process forked from one that imported this module (gymnasium's async vector env forks its
            # workers after building an env in the parent): the parent's OpenMP threads do not exist here, and a
            # multi-threaded torch call would wait for them forever. One thread per worker process.
            torch.set_num_threads(1)
        self.wm = WorldModel.from_checkpoint(path, device=device)
        if compile:
            self.wm.compile_inference()
        self.config = load_json(path / "config.json")
        # generation defaults come from the checkpoint (what its eval-model figures used)
        generation = self.config.get("generation", {})
        steps = int(generation.get("steps", 2)) if steps is None else steps
        temperature = float(generation.get("temperature", 1.0)) if temperature is None else temperature
        greedy = bool(generation.get("greedy", False)) if greedy is None else greedy
        if not 1 <= steps <= max_generation_steps(self.config):
            raise ValueError(f"steps (MaskGIT unmasking steps) must be in [1, {max_generation_steps(self.config)}] "
                             f"(the tokens of a frame). Got {steps=}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True). Got {temperature=}")
        if diffusion_steps is not None and (not self.wm.continuous or int(diffusion_steps) < 1):
            raise ValueError("diffusion_steps (DDIM steps per token) needs a mar checkpoint and must be >= 1. "
                             f"Got {diffusion_steps=} for a {self.wm.dynamics.config.head} model")
        self.diffusion_steps = None if diffusion_steps is None else int(diffusion_steps)
        self.env_config = self.config["env"]
        self.proprio = [(k, int(d)) for k, d in self.env_config["proprio"]]
        # success: the task's own predicate on the predicted object state where the model predicts it (one
        # frame is enough: the state is a committed draw); else the detector's probability at least
        # `success_threshold` on `success_frames` frames in a row
        self.object_task = object_task(self.env_config.get("task", ""))
        # the low-dimensional keys the env predicts: the state model's where the checkpoint has one (it carries
        # the proprio the trunk sees, plus the object state), else the trunk's own
        self.state_model = self.wm.state_model
        self.state_keys = checkpoint_state_keys(self.config)
        if self.state_model is not None:
            missing = [kd for kd in self.proprio if kd not in self.state_keys]
            if missing:
                raise CheckpointError(f"{path}: the state model predicts {self.state_keys}, not the trunk's {missing}")
            widths = [d for _, d in self.state_keys]
            start = dict(zip([k for k, _ in self.state_keys], np.cumsum([0] + widths)[:-1], strict=True))
            self.trunk_index = torch.as_tensor([start[k] + i for k, d in self.proprio for i in range(d)],
                                               device=self.wm.device)
        if OBJECT_KEY not in dict(self.state_keys):
            if self.object_task is not None:
                warnings.warn(
                    f"{path.name}: this world model does not predict the object state, so its success verdict comes "
                    "from a pixel detector trained on clean ground-truth frames; it is not to be trusted for "
                    "policies unlike the model's training data (uniform random actions 'succeed' in every episode; "
                    "MuJoCo: none). Give it a state model (hma-gym train-state --into: docs/training.md) to have it "
                    "scored by the task's own predicate on the predicted object state",
                    UnverifiedVerdictWarning, stacklevel=4)
            self.object_task = None
        default_frames = 1 if self.object_task else int(generation.get("success_frames", 1))
        success_frames = default_frames if success_frames is None else success_frames
        if success_threshold is None:
            success_threshold = float(generation.get("success_threshold", self.wm.threshold))
        if success_frames < 1:
            raise ValueError(f"success_frames must be >= 1. Got {success_frames=}")
        if not 0.0 < success_threshold < 1.0:
            raise ValueError(f"success_threshold must be in (0, 1). Got {success_threshold=}")
        self.success_frames, self.success_threshold = success_frames, float(success_threshold)
        self.streak = np.zeros(n, dtype=np.int64)
        if int(self.env_config.get("action_stride", 1)) != 1:
            raise CheckpointError(f"{path}: the env steps one control action per frame; action_stride must be 1")
        # the model's own observation (image + its whole state), and the keys the env returns: the GT env's
        # defaults unless `obs_keys` asks for others (e.g. robomimic's `object`)
        self.model_space, self.action_space = model_spaces(self.config)
        self.image_key = self.env_config["image_key"]
        if obs_keys is None:
            obs_keys = tuple(k for k in self.model_space.spaces if k != OBJECT_KEY)
        unknown = sorted(set(obs_keys) - set(self.model_space.spaces))
        if unknown:
            raise ValueError(f"obs_keys {unknown}: {path} predicts only {sorted(self.model_space.spaces)}"
                             + (" (its world model has no object state)" if OBJECT_KEY in unknown else ""))
        self.obs_keys = tuple(obs_keys)
        self.observation_space = spaces.Dict({k: self.model_space[k] for k in self.obs_keys})
        # competence: a step whose uncertainty (see `step`) passes this limit is outside what the model knows
        limit = generation.get("uncertainty_limit") if uncertainty_limit is None else uncertainty_limit
        self.uncertainty_limit = None if limit is None else float(limit)
        if end_unjudged and self.uncertainty_limit is None:
            raise ValueError(f"end_unjudged needs an uncertainty_limit ({path} has no calibrated one)")
        self.end_unjudged = end_unjudged
        # the range a start's state may take (see START_STD_LIMIT), in the order of `state_vector`
        stats = self.state_model if self.state_model is not None else self.wm
        mean, std = stats.state_mean.cpu().numpy(), stats.state_std.cpu().numpy()
        self.state_low, self.state_high = mean - START_STD_LIMIT * std, mean + START_STD_LIMIT * std
        self.bank = self.load_bank(path / "init_bank.safetensors")
        self.bank_size = len(self.bank[self.image_key])
        self.n, self.steps, self.temperature, self.greedy = n, steps, temperature, greedy
        self.cache = self.wm.new_cache(n)
        self.generator = torch.Generator(device=self.wm.device)
        self.obs: dict[str, np.ndarray] | None = None
        self.started = np.zeros(n, dtype=bool)
        self.unjudged = np.zeros(n, dtype=bool)
        # the state model's s_t, s_{t-1}, a_{t-1}, grasp decision and count of consecutive close commands per row
        self.state: torch.Tensor | None = None
        self.prev_state: torch.Tensor | None = None
        self.prev_action: torch.Tensor | None = None
        self.grasp: torch.Tensor | None = None
        self.closed: torch.Tensor | None = None

    def load_bank(self, path: Path) -> dict[str, np.ndarray]:
        """The initial-observation bank: every observation key, one or more entries, finite and in range."""
        bank = load_tensors(path)
        missing = set(self.model_space.spaces) - set(bank)
        if missing:
            raise CheckpointError(f"{path} lacks observation keys {sorted(missing)}")
        check_finite(bank, path)
        out = {k: bank[k].numpy() for k in self.model_space.spaces}
        n = len(out[self.image_key])
        if n == 0:
            raise CheckpointError(f"{path} holds no initial observation (reset(seed=...) draws one from it)")
        for key, space in self.model_space.spaces.items():
            kind_ok = out[key].dtype == np.uint8 if space.dtype == np.uint8 else out[key].dtype.kind == "f"
            if out[key].shape != (n, *space.shape) or not kind_ok:
                raise CheckpointError(f"{path}: {key!r} has shape {out[key].shape} {out[key].dtype}, config.json's "
                                      f"env section asks for ({n}, *{space.shape}) {space.dtype}")
            out[key] = out[key].astype(space.dtype, copy=False)
            why = self.out_of_range(key, out[key])
            if why:
                raise CheckpointError(f"{path}: {why}")
        return out

    def out_of_range(self, key: str, values: np.ndarray) -> str | None:
        """Why the low-dimensional `values` (..., dim) of `key` lie outside the range a start may take, or None."""
        offset = 0
        for name, dim in self.state_keys:
            if name == key:
                low, high = self.state_low[offset : offset + dim], self.state_high[offset : offset + dim]
                flat = np.asarray(values, np.float64).reshape(-1, dim)
                bad = (flat < low) | (flat > high)
                if not bad.any():
                    return None
                row, i = np.argwhere(bad)[0]
                return (f"{key}[{i}] = {flat[row, i]:g} is outside [{low[i]:g}, {high[i]:g}] (the checkpoint's "
                        f"state mean +- {START_STD_LIMIT:g} std: the model has never seen a value near it)")
            offset += dim
        return None

    # ------------------------------------------------------------------ conversions
    def state_vector(self, obs: dict[str, np.ndarray], keys: list[tuple[str, int]] | None = None) -> np.ndarray:
        """The concatenated low-dimensional values of `keys` (default: the trunk's state) of a batch."""
        return np.concatenate([np.asarray(obs[k], np.float32).reshape(len(obs[self.image_key]), -1)
                               for k, _ in (keys or self.proprio)], axis=1)

    def split_state(self, states: np.ndarray) -> dict[str, np.ndarray]:
        """A batch of predicted states (n, width of `state_keys`) -> one array per key."""
        out, i = {}, 0
        for key, dim in self.state_keys:
            value = states[:, i : i + dim].astype(np.float32)
            if key.endswith("_quat"):  # keep predicted quaternions unit length
                value = value / np.maximum(np.linalg.norm(value, axis=1, keepdims=True), 1e-6)
            out[key] = value
            i += dim
        return out

    def check_observation(self, obs: Any) -> dict[str, np.ndarray]:
        """An initial observation given by a caller: the learned env's keys, shapes and dtypes."""
        if not isinstance(obs, dict):
            raise ValueError(f"initial_observation must be a dict of arrays, got {type(obs).__name__}")
        out = {}
        for key, space in self.model_space.spaces.items():
            if key == OBJECT_KEY and key not in obs and self.image_key in obs:
                continue  # estimated below from the image
            if key not in obs:
                hint = (" (the world model's state includes it: make the GT env with obs_keys including "
                        f"{OBJECT_KEY!r})") if key == OBJECT_KEY else ""
                raise ValueError(f"initial_observation lacks {key!r} (needs {sorted(self.model_space.spaces)}){hint}")
            value = np.asarray(obs[key])
            if value.shape != space.shape:
                raise ValueError(f"initial_observation[{key!r}] has shape {value.shape}, expected {space.shape}")
            if space.dtype == np.uint8 and value.dtype != np.uint8:
                raise ValueError(f"initial_observation[{key!r}] must be uint8, got {value.dtype}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"initial_observation[{key!r}] holds NaN/inf")
            why = self.out_of_range(key, value)
            if why:
                raise ValueError(f"initial_observation: {why}")
            out[key] = value.astype(space.dtype)
        if OBJECT_KEY in self.model_space.spaces and OBJECT_KEY not in out:
            out[OBJECT_KEY] = self.estimate_object(out)
        return out

    def estimate_object(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The object state of a start given without it (e.g. a GT observation with the default keys): that of
        the bank start whose frame is nearest in pixels (the scene at reset differs by where the cube lies),
        with its derived parts (gripper-to-cube) recomputed for the given gripper. Exact only for a start of
        the bank itself; for a GT reset the cube is placed within ~5 mm (docs/envs.md). Pass `object` for
        exact paired runs."""
        frames = self.bank[self.image_key].reshape(self.bank_size, -1).astype(np.int32)
        nearest = int(((frames - obs[self.image_key].reshape(1, -1).astype(np.int32)) ** 2).sum(1).argmin())
        full = {**obs, OBJECT_KEY: self.bank[OBJECT_KEY][nearest]}
        state = torch.from_numpy(self.state_vector({k: v[None] for k, v in full.items()}, self.state_keys))
        state = self.state_model.make_consistent(state.to(self.wm.device)).cpu().numpy()
        return self.split_state(state)[OBJECT_KEY][0]

    # ------------------------------------------------------------------ episode control
    def reset_rows(self, rows: np.ndarray, starts: list[dict[str, np.ndarray]]) -> None:
        """Start episodes in the given rows from the given initial observations."""
        if self.obs is None:
            self.obs = {k: np.zeros((self.n, *s.shape), s.dtype) for k, s in self.model_space.spaces.items()}
        if len(rows) == 0:
            return
        for row, start in zip(rows, starts, strict=True):
            for key in self.obs:
                self.obs[key][row] = start[key]
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[torch.as_tensor(rows, dtype=torch.long)] = True
        mask = mask.to(self.wm.device)
        self.cache.reset(mask)
        # only the reset rows' frames are encoded (the model then runs on those rows alone)
        index = torch.as_tensor(rows, dtype=torch.long)
        codes = self.wm.encode(torch.from_numpy(self.obs[self.image_key][rows]))
        tokens = codes.new_zeros((self.n, *codes.shape[1:]))
        tokens[index.to(tokens.device)] = codes
        states = torch.from_numpy(self.state_vector(self.obs))
        self.wm.observe(self.cache, tokens, states, rows=None if bool(mask.all()) else mask)
        if self.state_model is not None:  # the state model's history: s_{t-1} = s_0, no action, no grasp
            full = torch.from_numpy(self.state_vector(self.obs, self.state_keys)).to(self.wm.device)
            if self.state is None:
                self.state, self.prev_state = torch.zeros_like(full), torch.zeros_like(full)
                self.prev_action = torch.zeros(self.n, self.action_space.shape[0], device=self.wm.device)
                self.grasp = torch.zeros(self.n, device=self.wm.device)
                self.closed = torch.zeros(self.n, device=self.wm.device)
            self.state[mask] = self.prev_state[mask] = full[mask]
            self.prev_action[mask] = 0.0
            self.grasp[mask] = self.closed[mask] = 0.0
        self.started[rows] = True
        self.streak[rows] = 0
        self.unjudged[rows] = False

    def observation(self, rows: slice | np.ndarray | int = slice(None)) -> dict[str, np.ndarray]:
        """Copies of the returned keys (`obs_keys`) of the given rows."""
        return {k: self.obs[k][rows].copy() for k in self.obs_keys}

    def draw_start(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        i = int(rng.integers(self.bank_size))
        return {k: v[i].copy() for k, v in self.bank.items()}

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """Advance every row by one frame. Returns observations, success, success probability and uncertainty.

        Success: the task's predicate (`hma_gym.tasks`) on the object state predicted by the checkpoint's
        state model (`hma_gym.models.state_model`; probability 0 or 1: each step commits to contact or not),
        else the detector's probability reached `success_threshold`; on the last `success_frames` frames of
        the row's episode. Uncertainty: the mean of the normalised entropy of this frame's image tokens
        (`HMA.generate_frame`) and, with a state model, the entropy of its contact decision (where a grasp
        is decided, of its grasp decision if larger); 0 = certain, 1 = uniform. A row whose uncertainty passed
        `uncertainty_limit` is marked in `self.unjudged` for the rest of its episode."""
        a = torch.from_numpy(np.ascontiguousarray(actions, dtype=np.float32))
        tokens, states, entropy = self.wm.generate(
            self.cache, a, steps=self.steps, temperature=self.temperature, generator=self.generator,
            greedy=self.greedy, diffusion_steps=self.diffusion_steps, return_uncertainty=True)
        if self.state_model is not None:
            # the low-dimensional step: the state model's; the trunk gets its proprio (so the next frames are
            # generated from the same arm the verdict is made from)
            a_dev = a.to(self.wm.device)
            full, self.grasp, self.closed, _, entropy["state"] = self.state_model.step(
                self.state, self.prev_state, a_dev, self.prev_action, self.grasp, self.closed)
            self.prev_state, self.state, self.prev_action = self.state, full, a_dev
            states = full.index_select(1, self.trunk_index)
        else:
            full = states
        self.wm.observe(self.cache, tokens, states, a)
        frames = self.wm.decode(tokens)
        self.obs = {self.image_key: frames.cpu().numpy(), **self.split_state(full.cpu().numpy())}
        if self.object_task is not None:
            prob = self.object_task.success(self.obs[OBJECT_KEY]).astype(np.float64)
            parts = [entropy["image"], entropy["state"]]
        else:
            prob = self.wm.success_prob(frames, states).cpu().numpy()
            parts = [entropy["image"]]
        values = torch.stack(parts).cpu().numpy()  # (parts, n); a mar model's image part is NaN
        known = ~np.isnan(values)
        uncertainty = np.where(known.any(0), np.where(known, values, 0).sum(0) / np.maximum(known.sum(0), 1), np.nan)
        if self.uncertainty_limit is not None:
            self.unjudged |= uncertainty > self.uncertainty_limit
        self.streak = np.where(prob >= self.success_threshold, self.streak + 1, 0)
        return self.obs, self.streak >= self.success_frames, prob, uncertainty


def _opened(sim: _LearnedSim | None, call: str) -> _LearnedSim:
    if sim is None:
        raise RuntimeError(f"{call}() called on a closed env; reset() opens it again")
    return sim


def _vector_info(**values: np.ndarray) -> dict[str, np.ndarray]:
    """A vector env's info as gymnasium's SyncVectorEnv builds it from single envs: each key with its `_key`
    mask (True: that env reported the key; every env does here)."""
    info: dict[str, np.ndarray] = {}
    for key, value in values.items():
        info[key], info[f"_{key}"] = value, np.ones(len(value), dtype=bool)
    return info


def _validate_actions(actions, n: int, dim: int) -> np.ndarray:
    arr = np.asarray(actions, dtype=np.float32)
    if arr.shape != (n, dim):
        raise ValueError(f"actions must have shape ({n}, {dim}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("actions must be finite (no NaN/inf)")
    return np.clip(arr, -1.0, 1.0)


class HMAEnv(gym.Env):
    """A learned simulator: `step` generates the next camera frame and proprio with an HMA world model.

    ## Spaces
    Exactly those of the ground-truth env its checkpoint was trained on (for the shipped Lift
    checkpoint: `RobomimicLift-v0`'s): `Box(-1, 1, (7,), float32)` actions; a `Dict` observation with
    `agentview_image` uint8 (64, 64, 3) and `robot0_eef_pos` (3,), `robot0_eef_quat` (4,),
    `robot0_gripper_qpos` (2,) float32, all predicted by the model.

    ## Low-dimensional state and verdicts
    A checkpoint with a state model (`hma_gym.models.state_model`, added by `hma-gym train-state
    --into`; the shipped default and `fast` have one) predicts the proprio and robomimic's `object` state
    step by step from the actions; `obs_keys` may ask for `object`. Success is then the task's own
    predicate (`hma_gym.tasks`, the GT env's too) on the predicted object state: reward 1.0 and
    `info["is_success"]` when it holds. Without a state model, a success detector trained on
    ground-truth frames scores every generated frame instead (probability past `success_threshold` on
    `success_frames` frames in a row), with an `UnverifiedVerdictWarning`: it does not fail policies
    unlike its training data. `terminated` on success unless `terminate_on_success=False`. Truncation
    comes from the registered `max_episode_steps` (100 for Lift). `info["uncertainty"]` (0-1) and
    `info["unjudged"]` say when the model is outside what it knows (`uncertainty_limit`, `end_unjudged`).

    ## Starting state
    `reset(seed=s)` draws an initial observation from the checkpoint's bank of ground-truth initial
    observations with `self.np_random`, and seeds the model's sampling from it: the same seed gives the
    same rollout (on the same device). `reset(options={"initial_observation": obs})` starts from a given
    observation (e.g. the GT env's reset observation) for paired runs.

    ## Arguments
    `checkpoint` (a packed checkpoint directory; default: the shipped one), `variant` (a shipped
    checkpoint: "maskgit", the default; "mar", the continuous variant; "fast", a 2-layer MaskGIT model;
    "fsq15k", a MaskGIT model with a factorised head on the 15,360-code tokenizer),
    `steps` (MaskGIT unmasking steps) and `temperature` (default: the checkpoint's `generation` settings,
    2 steps), `greedy` (argmax decoding; default: the checkpoint's), `device`,
    `terminate_on_success`, `render_mode` ("rgb_array"), `success_frames` and `success_threshold`
    (the success rule above; default: the checkpoint's, calibrated by `hma-gym calibrate-success`),
    `compile` (``torch.compile`` the model's hot paths: a minute of compiling during the first steps,
    then faster steps; see `WorldModel.compile_inference`), `diffusion_steps` (mar checkpoints only:
    DDIM steps per token; default: the model's `diff_sample_steps`).

    ## Cost
    One frame = `steps` masked passes of the trunk over a single frame's tokens plus the pass that
    stores the previous frame's keys/values (a key/value cache holds the previous frames, a sliding
    window of the training context; on a GPU, and for up to 4 envs on CPU, that pass runs inside the
    first masked pass), a tokenizer decode and a detector call; constant per step however long the
    episode.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, checkpoint: str | os.PathLike | None = None, variant: str = "maskgit",
                 steps: int | None = None, temperature: float | None = None, greedy: bool | None = None,
                 device: str = "cpu", terminate_on_success: bool = True, render_mode: str | None = None,
                 success_frames: int | None = None, success_threshold: float | None = None, compile: bool = False,
                 diffusion_steps: int | None = None, obs_keys: tuple[str, ...] | None = None,
                 uncertainty_limit: float | None = None, end_unjudged: bool = False):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array'. Got {render_mode=}")
        self._open_sim = partial(_LearnedSim, checkpoint, 1, steps, temperature, greedy, device, variant,
                                 success_frames, success_threshold, compile, diffusion_steps, obs_keys,
                                 uncertainty_limit, end_unjudged)
        self.sim: _LearnedSim | None = self._open_sim()
        self._checkpoint = self.sim.checkpoint
        self.observation_space, self.action_space = self.sim.observation_space, self.sim.action_space
        self.metadata = {**self.metadata, "render_fps": int(self.sim.env_config.get("control_freq", 20))}
        self.render_mode = render_mode
        self.terminate_on_success = terminate_on_success

    @property
    def checkpoint(self) -> Path:
        return self._checkpoint

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        options = check_reset_options(options, ("initial_observation",))
        super().reset(seed=seed)
        if self.sim is None:  # closed: load the model again
            self.sim = self._open_sim()
        if "initial_observation" in options:
            start = self.sim.check_observation(options["initial_observation"])
        else:
            start = self.sim.draw_start(self.np_random)
        self.sim.generator.manual_seed(int(self.np_random.integers(2**62)))
        self.sim.reset_rows(np.array([0]), [start])
        return self._obs(), {"is_success": False, "success_prob": 0.0, "uncertainty": 0.0, "unjudged": False}

    def step(self, action):
        if not _opened(self.sim, "step").started[0]:
            raise RuntimeError("step() called before reset()")
        action = RobosuiteEnv.validate_action(action, self.action_space.shape[0])
        _, success, prob, uncertainty = self.sim.step(action[None])
        unjudged = bool(self.sim.unjudged[0])
        # an episode the model has lost track of ends unscored when asked (`end_unjudged`)
        stop = unjudged and self.sim.end_unjudged
        success = bool(success[0]) and not stop
        return (self._obs(), 1.0 if success else 0.0, success and self.terminate_on_success, stop,
                {"is_success": success, "success_prob": float(prob[0]), "uncertainty": float(uncertainty[0]),
                 "unjudged": unjudged})

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if _opened(self.sim, "render").obs is None:
            raise RuntimeError("render() called before reset()")
        return self.sim.obs[self.sim.image_key][0].copy()

    def close(self):
        """Release the model (weights, key/value cache, bank): a closed env that is still referenced holds no
        model memory. `reset()` loads it again."""
        self.sim = None
        super().close()

    def _obs(self) -> dict[str, np.ndarray]:
        return self.sim.observation(0)


class HMAVectorEnv(gym.vector.VectorEnv):
    """`num_envs` learned envs stepped by one batched model call per step.

    Gymnasium's default next-step autoreset: the step after an episode ends returns that env's new
    initial observation (reward 0, not terminated). `reset(seed=[...], options={"initial_observation":
    batched_obs})` seeds and starts each env; `options={"reset_mask": mask}` resets only some envs.
    Truncation after `max_episode_steps` (the registered id's) is handled here. `info` holds `is_success`
    (bool) and `success_prob` (float64) per env, each with its `_is_success` / `_success_prob` mask, as
    gymnasium's `SyncVectorEnv` gives them for the same env.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20, "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, checkpoint: str | os.PathLike | None = None, variant: str = "maskgit",
                 steps: int | None = None, temperature: float | None = None, greedy: bool | None = None,
                 device: str = "cpu",
                 terminate_on_success: bool = True, max_episode_steps: int | None = None,
                 render_mode: str | None = None, success_frames: int | None = None,
                 success_threshold: float | None = None, compile: bool = False,
                 diffusion_steps: int | None = None, obs_keys: tuple[str, ...] | None = None,
                 uncertainty_limit: float | None = None, end_unjudged: bool = False):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1. Got {num_envs=}")
        self.num_envs = num_envs
        self._open_sim = partial(_LearnedSim, checkpoint, num_envs, steps, temperature, greedy, device, variant,
                                 success_frames, success_threshold, compile, diffusion_steps, obs_keys,
                                 uncertainty_limit, end_unjudged)
        self.sim: _LearnedSim | None = self._open_sim()
        self.single_observation_space = self.sim.observation_space
        self.single_action_space = self.sim.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {**self.metadata, "render_fps": int(self.sim.env_config.get("control_freq", 20))}
        self.render_mode = render_mode
        self.terminate_on_success = terminate_on_success
        self.max_episode_steps = max_episode_steps or self.sim.env_config.get("max_episode_steps")
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self.needs_reset = np.zeros(num_envs, dtype=bool)
        self.rngs = [np.random.default_rng() for _ in range(num_envs)]

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        options = dict(check_reset_options(options, ("initial_observation", "reset_mask")))
        if self.sim is None:  # closed: load the model again
            self.sim, self.closed = self._open_sim(), False
        mask = np.asarray(options.pop("reset_mask", np.ones(self.num_envs, bool)), dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
        if not self.sim.started.all() and not mask.all():
            raise RuntimeError("the first reset() must reset every env")
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, (int, np.integer)) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
            for i in np.flatnonzero(mask):
                if seeds[i] is not None:
                    self.rngs[i] = np.random.default_rng(seeds[i])
            first = next((s for i, s in enumerate(seeds) if mask[i] and s is not None), None)
            if first is not None:
                self.sim.generator.manual_seed(int(np.random.default_rng(first).integers(2**62)))
        rows = np.flatnonzero(mask)
        if "initial_observation" in options:
            given = options["initial_observation"]
            starts = [self.sim.check_observation({k: np.asarray(v)[i] for k, v in given.items()}) for i in rows]
        else:
            starts = [self.sim.draw_start(self.rngs[i]) for i in rows]
        self.sim.reset_rows(rows, starts)
        self.elapsed[rows] = 0
        self.needs_reset[rows] = False
        n = self.num_envs
        info = _vector_info(is_success=np.zeros(n, bool), success_prob=np.zeros(n), uncertainty=np.zeros(n),
                            unjudged=np.zeros(n, bool))
        return self.sim.observation(), info

    def step(self, actions):
        if not _opened(self.sim, "step").started.all():
            raise RuntimeError("step() called before reset()")
        actions = _validate_actions(actions, self.num_envs, self.single_action_space.shape[0])
        autoreset = self.needs_reset.copy()
        _, success, prob, uncertainty = self.sim.step(actions)
        obs = self.sim.observation()
        unjudged = self.sim.unjudged.copy()
        stop = unjudged & self.sim.end_unjudged  # episodes the model lost track of end unscored when asked
        success &= ~stop
        self.elapsed += 1
        reward = success.astype(np.float64)
        terminated = success & self.terminate_on_success
        truncated = (self.elapsed >= self.max_episode_steps) if self.max_episode_steps else np.zeros_like(success)
        truncated = (truncated | stop) & ~terminated
        if autoreset.any():
            rows = np.flatnonzero(autoreset)
            self.sim.reset_rows(rows, [self.sim.draw_start(self.rngs[i]) for i in rows])
            for key in obs:
                obs[key][rows] = self.sim.obs[key][rows]
            self.elapsed[rows] = 0
            reward[rows], terminated[rows], truncated[rows], success[rows], prob[rows] = 0.0, False, False, False, 0.0
            uncertainty[rows], unjudged[rows] = 0.0, False
        self.needs_reset = terminated | truncated
        info = _vector_info(is_success=success, success_prob=prob.astype(np.float64),
                            uncertainty=uncertainty.astype(np.float64), unjudged=unjudged)
        return obs, reward, terminated, truncated, info

    def render(self):
        if _opened(self.sim, "render").obs is None:
            raise RuntimeError("render() called before reset()")
        return tuple(self.sim.obs[self.sim.image_key].copy())

    def close_extras(self, **kwargs):
        """Release the model, as `HMAEnv.close` does; `reset()` loads it again."""
        self.sim = None
