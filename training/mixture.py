"""Heterogeneous training data: several robomimic files, each of its own embodiment, in one batch.

A mixture file (JSON) lists the datasets::

    {"datasets": [
        {"data": "data/mixture/sawyer_osc_pose.hdf5"},
        {"data": "data/mixture/kinova3_osc_pose_40hz.hdf5", "action_stride": 2},
        {"data": "my_robot.hdf5", "embodiment": "my_robot", "key_map": {"agentview_image": "front_rgb"}}
    ]}

Each dataset names its embodiment (else the `embodiment` that `hma-gym collect` writes into the file's
`env_args`, else `embodiment_name` of its robot, controller and rate), and an embodiment is one action
stem, head and set of normalisation statistics: datasets of one embodiment share them. `action_stride`
brings another control rate to the model's frame rate (a 40 Hz file with stride 2 gives 20 Hz frames
whose action is the two control actions concatenated). Every sample of a batch first draws its dataset,
with probability proportional to `n_windows ** power`: `power=1` samples by size, `power=0` uniformly
across datasets, and anything below 1 gives each window of a small dataset more weight than one of a
large dataset (inverse-size weighting), so small embodiments are not drowned out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hma_gym.data.hdf5 import DatasetError, read_env_args
from training.data import DataConfig, Episode, Normalizer, load_episodes, sample_windows, window_batch


@dataclass
class MixtureDataset:
    """One file of a mixture."""

    data: str
    embodiment: str = ""
    action_stride: int = 1
    key_map: dict[str, str] = field(default_factory=dict)
    max_demos: int = 0


@dataclass
class Source:
    """A loaded dataset: its embodiment and its train / valid episodes."""

    data: str
    embodiment: str
    action_stride: int
    train: list[Episode]
    valid: list[Episode]

    @property
    def n_windows(self) -> int:
        return sum(len(e) for e in self.train)


def embodiment_of(path: str) -> str:
    """The embodiment name a robomimic file declares (collect writes it), else <robot>_<controller>."""
    env_args = read_env_args(path)
    if env_args.get("embodiment"):
        return str(env_args["embodiment"])
    kwargs = env_args.get("env_kwargs", {})
    robots = kwargs.get("robots")
    robot = robots[0] if isinstance(robots, list) and robots else robots
    body = kwargs.get("controller_configs", {}).get("body_parts", {})
    part = body.get("right", {}) if isinstance(body, dict) else {}
    controller = part.get("type") or kwargs.get("controller_configs", {}).get("type")
    if not robot or not controller:
        raise DatasetError(f"{path}: env_args name no embodiment, robot or controller; give \"embodiment\" in "
                           f"the mixture file")
    return embodiment_name(robot, controller, int(kwargs.get("control_freq", 20)))


def embodiment_name(robot: str, controller: str, control_freq: int = 20) -> str:
    """The name a (robot, controller, rate) trains under, e.g. panda_osc_pose or kinova3_osc_pose_40hz."""
    name = f"{robot}_{controller}".lower()
    return name if control_freq == 20 else f"{name}_{control_freq}hz"


def read_mixture(path: str) -> list[MixtureDataset]:
    """Parse a mixture JSON file; errors name the file and the entry."""
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DatasetError(f"mixture file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"mixture file {path} is not valid JSON: {e}") from e
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries or not isinstance(entries, list):
        raise DatasetError(f"mixture file {path} needs a non-empty list \"datasets\"")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "data" not in entry:
            raise DatasetError(f"{path}: datasets[{i}] needs a \"data\" path")
        unknown = set(entry) - set(MixtureDataset.__dataclass_fields__)
        if unknown:
            raise DatasetError(f"{path}: datasets[{i}] has unknown keys {sorted(unknown)}")
        ds = MixtureDataset(**entry)
        if ds.action_stride < 1:
            raise DatasetError(f"{path}: datasets[{i}] action_stride must be >= 1")
        out.append(ds)
    return out


def load_sources(datasets: list[MixtureDataset], base: DataConfig, progress: bool = False) -> list[Source]:
    """Load every dataset's train and valid split with `base`'s keys and image size."""
    sources = []
    for ds in datasets:
        cfg = DataConfig(data=ds.data, image_key=base.image_key, proprio_keys=base.proprio_keys,
                         key_map=ds.key_map, image_size=base.image_size, action_stride=ds.action_stride,
                         max_demos=ds.max_demos)
        emb = ds.embodiment or embodiment_of(ds.data)
        sources.append(Source(ds.data, emb, ds.action_stride, load_episodes(cfg, "train", progress),
                              load_episodes(cfg, "valid", progress)))
    dims: dict[str, tuple[int, int]] = {}
    for s in sources:
        d = (s.train[0].actions.shape[1], s.train[0].states.shape[1])
        if dims.setdefault(s.embodiment, d) != d:
            raise DatasetError(f"{s.data}: embodiment {s.embodiment!r} has (action, state) dims {d} here but "
                               f"{dims[s.embodiment]} in another dataset of the mixture")
    return sources


def sampling_weights(sizes: list[int], power: float) -> np.ndarray:
    """Dataset probabilities proportional to size ** power (see the module docstring)."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if (sizes_arr <= 0).any():
        raise ValueError(f"every dataset needs training windows. Got sizes {sizes}")
    w = sizes_arr**power
    return w / w.sum()


def fit_normalizers(sources: list[Source]) -> dict[str, Normalizer]:
    """One normaliser per embodiment, fitted on all its training episodes."""
    by_emb: dict[str, list[Episode]] = {}
    for s in sources:
        by_emb.setdefault(s.embodiment, []).extend(s.train)
    return {name: Normalizer.fit(eps) for name, eps in by_emb.items()}


def mixed_batch(
    sources: list[Source],
    probs: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    T: int,
    norms: dict[str, Normalizer],
    embodiment_ids: dict[str, int],
    widths: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """A batch whose rows come from several datasets; actions/states zero-padded to `widths`.

    One dataset draws no dataset choices, so a single-file run samples exactly as before mixtures existed."""
    picks = rng.choice(len(sources), size=batch_size, p=probs) if len(sources) > 1 else np.zeros(batch_size, int)
    parts = []
    for k, src in enumerate(sources):
        n = int((picks == k).sum())
        if n:
            chosen = sample_windows(src.train, rng, n, T)
            parts.append(window_batch(src.train, chosen, T, norms[src.embodiment], embodiment_ids[src.embodiment]))
    A, S = widths
    return {
        "tokens": torch.cat([p["tokens"] for p in parts]),
        "actions": torch.cat([torch.nn.functional.pad(p["actions"], (0, A - p["actions"].shape[-1]))
                              for p in parts]),
        "states": torch.cat([torch.nn.functional.pad(p["states"], (0, S - p["states"].shape[-1])) for p in parts]),
        "embodiment_ids": torch.cat([p["embodiment_ids"] for p in parts]),
    }
