"""robomimic-layout HDF5: a crash-safe, appendable writer and a validating reader.

Layout (robomimic's): `data` (attrs `total`, `env_args` JSON), `data/demo_N/{actions, rewards, dones,
states, obs/*, next_obs/*}` with attrs `num_samples` and `model_file`, `mask/train`, `mask/valid`.

Crash safety: the file is opened, one finished episode is written and the file is closed again, so a
process killed while collecting loses at most the episode in flight. A demo's `num_samples` attribute
is written last; a demo without it (a kill during that short write) is dropped when the file is
reopened for appending.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import h5py
import numpy as np

DEMO_RE = re.compile(r"^demo_(\d+)$")


class DatasetError(ValueError):
    """A robomimic HDF5 file is missing something or holds malformed data."""


def demo_sort_key(name: str) -> int:
    m = DEMO_RE.match(name)
    return int(m.group(1)) if m else -1


def is_valid_split(index: int, valid_every: int) -> bool:
    """Deterministic split that survives appends: every `valid_every`-th demo is held out."""
    return valid_every > 0 and index % valid_every == valid_every - 1


@dataclass
class EpisodeBuffer:
    """Transitions of one episode, held in memory until `RobomimicWriter.write_episode`."""

    obs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    next_obs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    actions: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    dones: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    model_file: str | None = None
    attrs: dict = field(default_factory=dict)

    def add_step(self, obs: dict, action, reward: float, done: bool, next_obs: dict, state=None) -> None:
        """Record one transition (unbatched arrays)."""
        for key, value in obs.items():
            self.obs.setdefault(key, []).append(np.asarray(value))
        for key, value in next_obs.items():
            self.next_obs.setdefault(key, []).append(np.asarray(value))
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.rewards.append(float(reward))
        self.dones.append(int(done))
        if state is not None:
            self.states.append(np.asarray(state, dtype=np.float64))


class RobomimicWriter:
    """Append episodes to a robomimic-layout HDF5 file, one closed, valid file after each.

    `env_args` is robomimic's dict (`env_name`, `type`, `env_kwargs`) plus any project keys
    (e.g. `env_id`, `synthetic`). Reopening an existing file appends after its last demo; its
    `env_args` must name the same env.
    """

    def __init__(self, path: str | os.PathLike, env_args: dict, valid_every: int = 10):
        self.path = os.fspath(path)
        self.env_args = dict(env_args)
        self.valid_every = int(valid_every)
        self.episode_attrs = None
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(self.path):
            self._recover()
        else:
            with h5py.File(self.path, "w") as f:
                data = f.create_group("data")
                data.attrs["total"] = 0
                data.attrs["env_args"] = json.dumps(self.env_args)
                f.create_group("mask")
                _write_masks(f, [], self.valid_every)

    def _recover(self) -> None:
        try:
            f = h5py.File(self.path, "a")
        except OSError as e:
            raise DatasetError(f"{self.path}: cannot reopen for appending ({e})") from e
        with f:
            if "data" not in f:
                raise DatasetError(f"{self.path}: no 'data' group; not a robomimic file")
            data = f["data"]
            old = json.loads(data.attrs.get("env_args", "{}"))
            if old.get("env_name") != self.env_args.get("env_name"):
                raise DatasetError(
                    f"{self.path}: holds env {old.get('env_name')!r}, cannot append {self.env_args.get('env_name')!r}"
                )
            for name in list(data.keys()):
                if DEMO_RE.match(name) and "num_samples" not in data[name].attrs:
                    del data[name]  # the episode a kill interrupted mid-write
            names = sorted((n for n in data.keys() if DEMO_RE.match(n)), key=demo_sort_key)
            data.attrs["total"] = int(sum(int(data[n].attrs["num_samples"]) for n in names))
            _write_masks(f, names, self.valid_every)

    # ------------------------------------------------------------------ episodes
    def new_episode(self, model_file: str | None = None, episode_index: int | None = None, **attrs) -> EpisodeBuffer:
        """A buffer for one episode; several may be open at once (one per env of a vector env).

        With `self.episode_attrs` (a function of the rollout's episode index) its attributes are added,
        e.g. which source demo a synthetic episode replays.
        """
        if self.episode_attrs is not None and episode_index is not None:
            attrs = {**self.episode_attrs(episode_index), **attrs}
        return EpisodeBuffer(model_file=model_file, attrs=attrs)

    def write_episode(self, ep: EpisodeBuffer, **attrs) -> str:
        """Write a finished episode as the next demo and close the file. Returns the demo name."""
        if not ep.actions:
            raise RuntimeError("write_episode() with no recorded steps")
        n = len(ep.actions)
        with h5py.File(self.path, "a") as f:
            data = f["data"]
            names = [k for k in data.keys() if DEMO_RE.match(k)]
            index = max((demo_sort_key(k) for k in names), default=-1) + 1
            name = f"demo_{index}"
            g = data.create_group(name)
            g.create_dataset("actions", data=np.stack(ep.actions))
            g.create_dataset("rewards", data=np.asarray(ep.rewards, dtype=np.float64))
            g.create_dataset("dones", data=np.asarray(ep.dones, dtype=np.int64))
            if ep.states:
                if len(ep.states) != n:
                    raise DatasetError(f"{name}: {len(ep.states)} states for {n} actions")
                g.create_dataset("states", data=np.stack(ep.states))
            for group_name, source in (("obs", ep.obs), ("next_obs", ep.next_obs)):
                grp = g.create_group(group_name)
                for key, values in source.items():
                    arr = np.stack(values)
                    if arr.shape[0] != n:
                        raise DatasetError(f"{name}/{group_name}/{key}: {arr.shape[0]} rows for {n} actions")
                    kwargs = {"compression": "lzf"} if arr.dtype == np.uint8 and arr.ndim >= 3 else {}
                    grp.create_dataset(key, data=arr, **kwargs)
            if ep.model_file is not None:
                g.attrs["model_file"] = ep.model_file
            for key, value in {**ep.attrs, **attrs}.items():
                g.attrs[key] = value
            g.attrs["num_samples"] = n  # written last: marks the demo complete
            data.attrs["total"] = int(data.attrs.get("total", 0)) + n
            _write_masks(f, [*names, name], self.valid_every)
        return name


def _write_masks(f: h5py.File, names: list[str], valid_every: int) -> None:
    """mask/train and mask/valid, plus mask/train_success and mask/valid_success (demos whose `success`
    attribute is true, e.g. to train a policy on successful demos only)."""
    names = sorted(names, key=demo_sort_key)
    valid = [n for n in names if is_valid_split(demo_sort_key(n), valid_every)]
    train = [n for n in names if n not in set(valid)]
    data = f["data"] if "data" in f else None

    def succeeded(n: str) -> bool:
        return data is not None and n in data and bool(data[n].attrs.get("success", False))

    mask = f.require_group("mask")
    splits = {"train": train, "valid": valid, "train_success": [n for n in train if succeeded(n)],
              "valid_success": [n for n in valid if succeeded(n)]}
    for split, members in splits.items():
        if split in mask:
            del mask[split]
        mask.create_dataset(split, data=np.array(members, dtype="S"))


# ---------------------------------------------------------------------- reading
def read_env_args(path: str | os.PathLike) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f["data"].attrs["env_args"])


def list_demos(path: str | os.PathLike, split: str | None = None) -> list[str]:
    """Demo names in index order; `split` = "train" / "valid" uses the file's masks."""
    with h5py.File(path, "r") as f:
        if split is None:
            names = [n for n in f["data"].keys() if DEMO_RE.match(n)]
        else:
            if f"mask/{split}" not in f:
                raise DatasetError(f"{path}: no mask/{split}")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{split}"][()]]
    return sorted(names, key=demo_sort_key)


def read_demo(path: str | os.PathLike, name: str, keys: list[str] | None = None, next_obs: bool = False) -> dict:
    """One demo as numpy arrays: actions, rewards, dones, obs (dict), and states when present."""
    with h5py.File(path, "r") as f:
        g = f[f"data/{name}"]
        out = {k: g[k][()] for k in ("actions", "rewards", "dones", "states") if k in g}
        for grp in ("obs", "next_obs") if next_obs else ("obs",):
            out[grp] = {k: g[grp][k][()] for k in (keys or list(g[grp].keys())) if k in g[grp]}
        out["attrs"] = dict(g.attrs)
    return out


def iter_demos(path: str | os.PathLike, split: str | None = None, **kwargs) -> Iterator[tuple[str, dict]]:
    for name in list_demos(path, split):
        yield name, read_demo(path, name, **kwargs)


def validate_file(path: str | os.PathLike, require_states: bool | None = None) -> dict:
    """Check a robomimic-layout file; raise `DatasetError` naming every problem, else return a summary.

    `require_states=None` requires MuJoCo `states` unless `env_args` marks the file synthetic.
    """
    problems: list[str] = []
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        if "data" not in f:
            raise DatasetError(f"{path}: missing group 'data'")
        data = f["data"]
        env_args: dict = {}
        if "env_args" not in data.attrs:
            problems.append("data.attrs['env_args'] missing")
        else:
            try:
                env_args = json.loads(data.attrs["env_args"])
            except json.JSONDecodeError as e:
                problems.append(f"data.attrs['env_args'] is not JSON ({e})")
        if require_states is None:
            require_states = not env_args.get("synthetic", False)
        names = sorted((n for n in data.keys() if DEMO_RE.match(n)), key=demo_sort_key)
        total = 0
        obs_keys: set[str] | None = None
        for name in names:
            g = data[name]
            if "num_samples" not in g.attrs:
                problems.append(f"{name}: attr num_samples missing (incomplete demo)")
                continue
            n = int(g.attrs["num_samples"])
            total += n
            required = ["actions", "rewards", "dones", "obs", "next_obs"] + (["states"] if require_states else [])
            for key in required:
                if key not in g:
                    problems.append(f"{name}: missing {key}")
            for key in ("actions", "rewards", "dones", "states"):
                if key in g and g[key].shape[0] != n:
                    problems.append(f"{name}/{key}: {g[key].shape[0]} rows, num_samples={n}")
            if "actions" in g and not np.all(np.isfinite(g["actions"][()])):
                problems.append(f"{name}/actions: non-finite values")
            for grp in ("obs", "next_obs"):
                if grp not in g:
                    continue
                keys = set(g[grp].keys())
                if obs_keys is None:
                    obs_keys = keys
                elif keys != obs_keys:
                    problems.append(f"{name}/{grp}: keys {sorted(keys)} differ from {sorted(obs_keys)}")
                for key in keys:
                    if g[grp][key].shape[0] != n:
                        problems.append(f"{name}/{grp}/{key}: {g[grp][key].shape[0]} rows, num_samples={n}")
            if require_states and "model_file" not in g.attrs:
                problems.append(f"{name}: attr model_file missing")
        if int(data.attrs.get("total", -1)) != total:
            problems.append(f"data.attrs['total']={data.attrs.get('total')} but demos hold {total} samples")
        split_members: dict[str, list[str]] = {}
        for split in ("train", "valid"):
            if f"mask/{split}" not in f:
                problems.append(f"mask/{split} missing")
                continue
            members = [m.decode() if isinstance(m, bytes) else str(m) for m in f[f"mask/{split}"][()]]
            split_members[split] = members
            missing = [m for m in members if m not in data]
            if missing:
                problems.append(f"mask/{split} names missing demos {missing[:5]}")
        if problems:
            raise DatasetError(f"{path}: " + "; ".join(problems))
        return {
            "demos": len(names),
            "samples": total,
            "obs_keys": sorted(obs_keys or []),
            "train": len(split_members.get("train", [])),
            "valid": len(split_members.get("valid", [])),
            "env_args": env_args,
        }
