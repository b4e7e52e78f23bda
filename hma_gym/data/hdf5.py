"""robomimic-layout HDF5: a crash-safe, appendable writer and a validating reader.

Layout (robomimic's): `data` (attrs `total`, `env_args` JSON), `data/demo_N/{actions, rewards, dones,
states, obs/*, next_obs/*}` with attrs `num_samples` and `model_file`, `mask/train`, `mask/valid`.

Crash safety: the file is opened, one finished episode is written and the file is closed again, so a
process killed while collecting loses at most the episode in flight. A demo's `num_samples` attribute
is written last; a demo without it (a kill during that short write) is dropped when the file is
reopened for appending.

Readers beside a writer: HDF5 locks a file while it is open. The project's readers open files without a
lock (`open_for_reading`), so they never block a collection; a writer that finds the file locked by
another program (e.g. a notebook's plain `h5py.File(path)`) waits for it, saying so every few seconds,
and keeps the finished episode in memory meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h5py
import numpy as np

DEMO_RE = re.compile(r"^demo_(\d+)$")
IMAGE_SUFFIX = "_image"  # robomimic's naming of camera observations
LOCK_POLL_S = 0.2
LOCK_REPORT_EVERY_S = 5.0
log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A robomimic HDF5 file is missing something or holds malformed data."""


def demo_sort_key(name: str) -> int:
    m = DEMO_RE.match(name)
    return int(m.group(1)) if m else -1


def open_for_reading(path: str | os.PathLike) -> h5py.File:
    """Open read-only without taking HDF5's file lock, so that a writer appending meanwhile is not blocked."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        if "locking flag" not in str(e):
            raise
        # already open in this process with the lock (e.g. by robomimic's SequenceDataset): HDF5 shares one
        # open file per process and refuses a second opening with other locking flags
        return h5py.File(path, "r")


def open_for_writing(path: str | os.PathLike, mode: str = "a") -> h5py.File:
    """Open for writing; while another process holds the file open (HDF5's lock), wait and retry, logging a
    warning every few seconds. Mode "w" is refused: HDF5 truncates the file before it tries the lock."""
    if mode not in ("a", "r+", "x", "w-"):
        raise ValueError(f"mode must be a, r+, x or w-. Got {mode=}")
    start = time.monotonic()
    next_report = start
    while True:
        try:
            return h5py.File(path, mode)
        except BlockingIOError:
            now = time.monotonic()
            if now >= next_report:
                log.warning("waiting for %s: another process has it open (waited %.0f s so far)", path, now - start)
                next_report = now + LOCK_REPORT_EVERY_S
            time.sleep(LOCK_POLL_S)


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
            with open_for_writing(self.path, "x") as f:
                data = f.create_group("data")
                data.attrs["total"] = 0
                data.attrs["env_args"] = json.dumps(self.env_args)
                f.create_group("mask")
                _write_masks(f, [], self.valid_every)

    def _recover(self) -> None:
        try:
            f = open_for_writing(self.path)
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
            self._recount(f)

    def truncate(self, keep: int) -> None:
        """Delete every demo whose index is `keep` or more (e.g. the episodes of an unfinished batch that a
        resumed run makes again); totals and masks follow."""
        with open_for_writing(self.path) as f:
            for name in [n for n in f["data"].keys() if DEMO_RE.match(n) and demo_sort_key(n) >= keep]:
                del f["data"][name]
            self._recount(f)

    def _recount(self, f: h5py.File) -> None:
        """`data.attrs["total"]` and the masks from the demos the file holds."""
        names = [n for n in f["data"].keys() if DEMO_RE.match(n)]
        f["data"].attrs["total"] = int(sum(int(f["data"][n].attrs["num_samples"]) for n in names))
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
        with open_for_writing(self.path) as f:
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
    attribute is true and that are not marked `unjudged`, e.g. to train a policy on successful demos only)."""
    names = sorted(names, key=demo_sort_key)
    valid = [n for n in names if is_valid_split(demo_sort_key(n), valid_every)]
    train = [n for n in names if n not in set(valid)]
    data = f["data"] if "data" in f else None

    def succeeded(n: str) -> bool:
        attrs = data[n].attrs if data is not None and n in data else {}
        return bool(attrs.get("success", False)) and not bool(attrs.get("unjudged", False))

    mask = f.require_group("mask")
    splits = {"train": train, "valid": valid, "train_success": [n for n in train if succeeded(n)],
              "valid_success": [n for n in valid if succeeded(n)]}
    for split, members in splits.items():
        if split in mask:
            del mask[split]
        mask.create_dataset(split, data=np.array(members, dtype="S"))


# ---------------------------------------------------------------------- reading
def read_env_args(path: str | os.PathLike) -> dict:
    with open_for_reading(path) as f:
        return json.loads(f["data"].attrs["env_args"])


def list_demos(path: str | os.PathLike, split: str | None = None) -> list[str]:
    """Demo names in index order; `split` = "train" / "valid" uses the file's masks."""
    with open_for_reading(path) as f:
        if split is None:
            names = [n for n in f["data"].keys() if DEMO_RE.match(n)]
        else:
            if f"mask/{split}" not in f:
                raise DatasetError(f"{path}: no mask/{split}")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{split}"][()]]
    return sorted(names, key=demo_sort_key)


def read_demo(path: str | os.PathLike, name: str, keys: list[str] | None = None, next_obs: bool = False) -> dict:
    """One demo as numpy arrays: actions, rewards, dones, obs (dict), and states when present."""
    with open_for_reading(path) as f:
        g = f[f"data/{name}"]
        out = {k: g[k][()] for k in ("actions", "rewards", "dones", "states") if k in g}
        for grp in ("obs", "next_obs") if next_obs else ("obs",):
            out[grp] = {k: g[grp][k][()] for k in (keys or list(g[grp].keys())) if k in g[grp]}
        out["attrs"] = dict(g.attrs)
    return out


def iter_demos(path: str | os.PathLike, split: str | None = None, **kwargs) -> Iterator[tuple[str, dict]]:
    for name in list_demos(path, split):
        yield name, read_demo(path, name, **kwargs)


MAX_PROBLEMS = 8  # listed in a DatasetError's one line; the rest are counted


def validate_file(
    path: str | os.PathLike,
    require_states: bool | None = None,
    image_key: str | None = None,
    obs_keys: tuple[str, ...] | list[str] = (),
) -> dict:
    """Check a robomimic-layout file; raise a one-line `DatasetError` naming the problems, else return a summary.

    What every trainer relies on is checked in every demo: `actions` finite floats of shape
    (num_samples, action_dim) with one action_dim throughout; `rewards` and `dones` (num_samples,); every
    `obs` / `next_obs` key a dataset of num_samples rows, with the same keys, dtypes and shapes in every
    demo; low-dimensional values finite; camera images (`*_image` keys and `image_key`) uint8
    (num_samples, H, W, 3), channels last. `image_key` and `obs_keys` are keys the caller needs in every
    demo's `obs` and `next_obs`. `require_states=None` requires MuJoCo `states` unless `env_args` marks the
    file synthetic.
    """
    problems: list[str] = []
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: file does not exist")
    try:
        f = open_for_reading(path)
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({_one_line(e)})") from e
    with f:
        if not isinstance(f.get("data"), h5py.Group):
            raise DatasetError(f"{path}: missing group 'data'")
        data = f["data"]
        env_args: dict = {}
        if "env_args" not in data.attrs:
            problems.append("data.attrs['env_args'] missing")
        else:
            try:
                env_args = json.loads(data.attrs["env_args"])
            except (json.JSONDecodeError, TypeError) as e:
                problems.append(f"data.attrs['env_args'] is not JSON ({e})")
            if not isinstance(env_args, dict):
                problems.append(f"data.attrs['env_args'] is a JSON {type(env_args).__name__}; expected an object")
                env_args = {}
        if require_states is None:
            require_states = not env_args.get("synthetic", False)
        required_obs = [k for k in (image_key, *obs_keys) if k]
        names = sorted((n for n in data.keys() if DEMO_RE.match(n)), key=demo_sort_key)
        total = 0
        seen: dict[str, str] = {}  # "actions" / "obs/KEY" -> "dtype (rows, ...)" of the first demo
        obs_keys_first: set[str] | None = None
        for name in names:
            try:
                n, keys = _check_demo(data[name], name, require_states, required_obs, image_key, seen, problems)
            except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
                problems.append(f"{name}: unreadable ({type(e).__name__}: {_one_line(e)})")
                continue
            total += n
            for grp, grp_keys in keys.items():
                if obs_keys_first is None:
                    obs_keys_first = grp_keys
                elif grp_keys != obs_keys_first:
                    problems.append(f"{name}/{grp}: keys {sorted(grp_keys)} differ from {sorted(obs_keys_first)}")
        try:
            stored_total = int(data.attrs.get("total", -1))
        except (TypeError, ValueError):
            stored_total = None
        if stored_total != total:
            problems.append(f"data.attrs['total']={data.attrs.get('total')} but demos hold {total} samples")
        split_members: dict[str, list[str]] = {}
        for split in ("train", "valid"):
            mask = f.get(f"mask/{split}")
            if mask is None:
                problems.append(f"mask/{split} missing")
                continue
            if not isinstance(mask, h5py.Dataset) or mask.ndim != 1:
                problems.append(f"mask/{split}: expected a 1-D dataset of demo names")
                continue
            members = [m.decode() if isinstance(m, bytes) else str(m) for m in mask[()]]
            split_members[split] = members
            missing = [m for m in members if m not in data]
            if missing:
                problems.append(f"mask/{split} names missing demos {missing[:5]}")
        if problems:
            more = f"; ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
            raise DatasetError(f"{path}: " + "; ".join(problems[:MAX_PROBLEMS]) + more)
        return {
            "demos": len(names),
            "samples": total,
            "obs_keys": sorted(obs_keys_first or []),
            "train": len(split_members.get("train", [])),
            "valid": len(split_members.get("valid", [])),
            "env_args": env_args,
        }


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _describe(ds: h5py.Dataset) -> str:
    return f"{ds.dtype} {ds.shape}"


def _nonfinite(ds: h5py.Dataset) -> str | None:
    """None when every value is finite, else how many are not and the first row holding one."""
    values = ds[()]
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    rows = bad.reshape(len(values), -1).any(axis=1)
    return f"{int(bad.sum())} non-finite values (NaN/inf), the first in row {int(np.argmax(rows))}"


def _check_demo(g, name: str, require_states: bool, required_obs: list[str], image_key: str | None,
                seen: dict[str, str], problems: list[str]) -> tuple[int, dict[str, set[str]]]:
    """Append the problems of one demo; returns its num_samples (0 if unknown) and its obs key sets."""
    if not isinstance(g, h5py.Group):
        problems.append(f"data/{name} is a dataset; expected a demo group")
        return 0, {}
    if "num_samples" not in g.attrs:
        problems.append(f"{name}: attr num_samples missing (incomplete demo)")
        return 0, {}
    try:
        n = int(g.attrs["num_samples"])
    except (TypeError, ValueError):
        problems.append(f"{name}: attr num_samples={g.attrs['num_samples']!r} is not an integer")
        return 0, {}

    def dataset(key: str) -> h5py.Dataset | None:
        if key not in g:
            problems.append(f"{name}: missing {key}")
            return None
        if not isinstance(g[key], h5py.Dataset):
            problems.append(f"{name}/{key} is a group; expected a dataset")
            return None
        return g[key]

    def same_as_first(label: str, key: str, ds: h5py.Dataset) -> None:
        desc = f"{ds.dtype} ({', '.join(['rows', *map(str, ds.shape[1:])])})"
        if seen.setdefault(key, desc) != desc:
            problems.append(f"{label}: {desc}; other demos have {seen[key]}")

    actions = dataset("actions")
    if actions is not None:
        if actions.ndim != 2 or actions.shape[0] != n:
            problems.append(f"{name}/actions: {_describe(actions)}; expected ({n}, action_dim)")
        elif actions.dtype.kind != "f":
            problems.append(f"{name}/actions: {_describe(actions)}; expected floats")
        else:
            same_as_first(f"{name}/actions", "actions", actions)
            bad = _nonfinite(actions)
            if bad:
                problems.append(f"{name}/actions: {bad}")
    for key in ("rewards", "dones"):
        ds = dataset(key)
        if ds is not None and ds.shape != (n,):
            problems.append(f"{name}/{key}: {_describe(ds)}; expected ({n},)")
    if require_states:
        ds = dataset("states")
        if ds is not None and (ds.ndim != 2 or ds.shape[0] != n):
            problems.append(f"{name}/states: {_describe(ds)}; expected ({n}, state_dim)")
        if "model_file" not in g.attrs:
            problems.append(f"{name}: attr model_file missing")
    elif isinstance(g.get("states"), h5py.Dataset) and g["states"].shape[:1] != (n,):
        problems.append(f"{name}/states: {_describe(g['states'])}; expected {n} rows")

    keys: dict[str, set[str]] = {}
    for grp in ("obs", "next_obs"):
        if grp not in g:
            problems.append(f"{name}: missing {grp}")
            continue
        if not isinstance(g[grp], h5py.Group):
            problems.append(f"{name}/{grp} is a dataset; expected a group of observation keys")
            continue
        keys[grp] = set(g[grp].keys())
        for key in required_obs:
            if key not in keys[grp]:
                problems.append(f"{name}/{grp}: no observation {key!r} (its keys: {sorted(keys[grp])})")
        for key in sorted(keys[grp]):
            ds, label = g[grp][key], f"{name}/{grp}/{key}"
            if not isinstance(ds, h5py.Dataset):
                problems.append(f"{label} is a group; expected a dataset of {n} rows")
                continue
            if ds.ndim == 0 or ds.shape[0] != n:
                problems.append(f"{label}: {_describe(ds)}; expected {n} rows (num_samples)")
                continue
            if key.endswith(IMAGE_SUFFIX) or key == image_key:
                if ds.dtype != np.uint8 or ds.ndim != 4 or ds.shape[-1] != 3:
                    problems.append(f"{label}: {_describe(ds)}; expected uint8 images ({n}, H, W, 3), channels last")
                continue  # image sizes may differ between demos: the trainers resize
            elif ds.dtype.kind not in "fiub":
                problems.append(f"{label}: {_describe(ds)}; expected numbers")
                continue
            elif ds.dtype.kind == "f":
                bad = _nonfinite(ds)
                if bad:
                    problems.append(f"{label}: {bad}")
            same_as_first(label, f"obs/{key}", ds)
    return n, keys
