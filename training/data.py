"""robomimic HDF5 -> in-memory episodes, normalisation statistics and training windows.

Works on any robomimic-layout file: images of another size are resized on load, other key names are
mapped by `key_map`, `action_stride` groups k control steps into one model frame (a frame's action is
the concatenation of the k actions that follow it), and the file's `mask/train` / `mask/valid` decide
which demos train and which evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hma_gym.data.hdf5 import DatasetError, list_demos, read_demo, validate_file
from hma_gym.envs.robosuite_env import DEFAULT_PROPRIO_KEYS


@dataclass
class DataConfig:
    """Which file, which keys, which image size and frame rate."""

    data: str = "data/lift.hdf5"
    """robomimic-layout HDF5 file."""
    extra_data: tuple[str, ...] = ()
    """More robomimic files of the same embodiment and keys (e.g. GT rollouts of imperfect policies); their
    demos join each split of `data`."""
    image_key: str = "agentview_image"
    """Camera observation key (after key_map)."""
    proprio_keys: tuple[str, ...] = DEFAULT_PROPRIO_KEYS
    """Low-dimensional observation keys the model predicts (after key_map), concatenated in order."""
    key_map: dict[str, str] = field(default_factory=dict)
    """Project key -> key in the file, for files that name observations differently (JSON)."""
    image_size: int = 64
    """Images are resized to this size on load."""
    action_stride: int = 1
    """Control steps per model frame (unifies control frequencies)."""
    max_demos: int = 0
    """Use at most this many demos per split (0 = all)."""

    def __post_init__(self):
        if self.action_stride < 1:
            raise ValueError(f"action_stride must be >= 1. Got {self.action_stride=}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8. Got {self.image_size=}")


@dataclass
class Episode:
    """One demo at the model's frame rate: frames[t] -> actions[t] -> frames[t+1]."""

    name: str
    frames: np.ndarray  # (L+1, H, W, 3) uint8
    states: np.ndarray  # (L+1, S) float32
    actions: np.ndarray  # (L, A * stride) float32
    success: np.ndarray  # (L+1,) bool: the task is solved in frame t
    tokens: np.ndarray | None = None  # (L+1, g, g) int16 codes or (L+1, g, g, C) float16 latents (mar)

    def __len__(self) -> int:
        return len(self.states)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (area-averaged down, bilinear up)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mode = "area" if frames.shape[1] > size else "bilinear"
    y = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_episodes(cfg: DataConfig, split: str | None, progress: bool = False) -> list[Episode]:
    """Episodes of one split ("train", "valid" or None for all) as arrays in memory.

    Demos of `cfg.extra_data` files follow those of `cfg.data`, named `file:demo_N`; `max_demos`
    applies per file.
    """
    file_key = {k: cfg.key_map.get(k, k) for k in (cfg.image_key, *cfg.proprio_keys)}
    sources = []
    for i, path in enumerate((cfg.data, *cfg.extra_data)):
        validate_file(path, image_key=file_key[cfg.image_key], obs_keys=[file_key[k] for k in cfg.proprio_keys])
        names = list_demos(path, split)
        if cfg.max_demos:
            names = names[: cfg.max_demos]
        sources += [(path, name, name if i == 0 else f"{path}:{name}") for name in names]
    if not sources:
        files = ", ".join((cfg.data, *cfg.extra_data))
        raise DatasetError(f"{files}: no demos in split {split!r}")
    episodes = []
    for path, name, label in tqdm(sources, desc=f"load {split or 'all'}", disable=not progress):
        demo = read_demo(path, name, keys=list(file_key.values()), next_obs=True)
        obs, nxt = demo["obs"], demo["next_obs"]
        frames = np.concatenate([obs[file_key[cfg.image_key]], nxt[file_key[cfg.image_key]][-1:]])
        states = np.concatenate(
            [np.concatenate([obs[file_key[k]], nxt[file_key[k]][-1:]]).reshape(len(frames), -1)
             for k in cfg.proprio_keys], axis=1
        ).astype(np.float32)
        actions = demo["actions"].astype(np.float32)
        # rewards[t] is the success signal of the frame reached by action t
        success = np.concatenate([[False], demo["rewards"] > 0])
        k = cfg.action_stride
        n_frames = (len(actions)) // k + 1
        idx = np.arange(n_frames) * k
        episodes.append(Episode(
            name=label,
            frames=resize_frames(frames[idx], cfg.image_size),
            states=states[idx],
            actions=actions[: (n_frames - 1) * k].reshape(n_frames - 1, -1),
            success=success[idx],
        ))
    return episodes


@dataclass
class Normalizer:
    """Per-dimension mean/std of states and actions (std floored so constant dims stay finite)."""

    state_mean: np.ndarray
    state_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray

    @classmethod
    def fit(cls, episodes: list[Episode], min_std: float = 1e-2) -> Normalizer:
        s = np.concatenate([e.states for e in episodes])
        a = np.concatenate([e.actions for e in episodes])
        return cls(s.mean(0), np.maximum(s.std(0), min_std), a.mean(0), np.maximum(a.std(0), min_std))

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": torch.as_tensor(getattr(self, k), dtype=torch.float32)
                for k in ("state_mean", "state_std", "action_mean", "action_std")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> Normalizer:
        return cls(*(tensors[f"{prefix}{k}"].cpu().numpy() for k in
                     ("state_mean", "state_std", "action_mean", "action_std")))

    def norm_state(self, s):
        return (s - self.state_mean) / self.state_std

    def denorm_state(self, s):
        return s * self.state_std + self.state_mean

    def norm_action(self, a):
        return (a - self.action_mean) / self.action_std


def sample_windows(
    episodes: list[Episode],
    rng: np.random.Generator,
    batch_size: int,
    T: int,
) -> list[tuple[int, int]]:
    """(episode index, start frame) of `batch_size` windows of T frames, episodes weighted by length."""
    usable = [i for i, e in enumerate(episodes) if len(e) >= T]
    if not usable:
        raise DatasetError(f"no episode has the {T} frames a training window needs")
    weights = np.array([len(episodes[i]) - T + 1 for i in usable], dtype=np.float64)
    picks = rng.choice(len(usable), size=batch_size, p=weights / weights.sum())
    return [(usable[p], int(rng.integers(0, len(episodes[usable[p]]) - T + 1))) for p in picks]


def token_tensor(tokens: np.ndarray) -> torch.Tensor:
    """Stored tokens -> model input: integer codes as int64, continuous latents (mar) as float32."""
    t = torch.from_numpy(np.ascontiguousarray(tokens))
    return t.float() if t.is_floating_point() else t.long()


def window_batch(
    episodes: list[Episode],
    windows: list[tuple[int, int]],
    T: int,
    norm: Normalizer,
    embodiment_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Stack windows into the HMA batch layout (tokens, normalised actions/states, ids)."""
    tokens, actions, states = [], [], []
    for i, start in windows:
        e = episodes[i]
        if e.tokens is None:
            raise ValueError(f"episode {e.name} has no tokens; pre-tokenise first")
        tokens.append(e.tokens[start : start + T])
        a = norm.norm_action(e.actions[start : start + T])  # the last frame may have no action
        actions.append(np.pad(a, ((0, T - len(a)), (0, 0))))
        states.append(norm.norm_state(e.states[start : start + T]))
    return {
        "tokens": token_tensor(np.stack(tokens)),
        "actions": torch.from_numpy(np.stack(actions)).float(),
        "states": torch.from_numpy(np.stack(states)).float(),
        "embodiment_ids": torch.full((len(windows),), embodiment_id, dtype=torch.long),
    }
