"""One rollout loop for evaluation and data collection, single or vector env alike."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm


@dataclass
class EpisodeResult:
    index: int
    seed: int | None
    success: bool
    ret: float
    length: int
    unjudged: bool = False
    """A learned env lost track of the episode (`info["unjudged"]`: its uncertainty passed its limit)."""
    max_uncertainty: float = float("nan")
    """The highest `info["uncertainty"]` of the episode (learned envs; NaN where the env reports none)."""


@dataclass
class RolloutResult:
    """Per-episode outcomes plus wall time; `success_rate`, `mean_length`, `steps_per_s`."""

    episodes: list[EpisodeResult] = field(default_factory=list)
    wall_time_s: float = 0.0
    env_steps: int = 0

    @property
    def success_rate(self) -> float:
        return float(np.mean([e.success for e in self.episodes])) if self.episodes else float("nan")

    @property
    def unjudged(self) -> int:
        """Episodes a learned env could not judge (see `EpisodeResult.unjudged`)."""
        return sum(e.unjudged for e in self.episodes)

    @property
    def judged_success_rate(self) -> float:
        """Success rate over the episodes the env could judge."""
        judged = [e.success for e in self.episodes if not e.unjudged]
        return float(np.mean(judged)) if judged else float("nan")

    @property
    def mean_length(self) -> float:
        return float(np.mean([e.length for e in self.episodes])) if self.episodes else float("nan")

    @property
    def mean_return(self) -> float:
        return float(np.mean([e.ret for e in self.episodes])) if self.episodes else float("nan")

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.wall_time_s if self.wall_time_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "episodes": len(self.episodes),
            "success_rate": self.success_rate,
            "unjudged": self.unjudged,
            "judged_success_rate": self.judged_success_rate,
            "mean_length": self.mean_length,
            "mean_return": self.mean_return,
            "env_steps": self.env_steps,
            "wall_time_s": self.wall_time_s,
            "steps_per_s": self.steps_per_s,
            "per_episode": [asdict(e) for e in self.episodes],
        }


def _episode_seeds(seeds, n: int) -> list[int | None]:
    if seeds is None:
        return [None] * n
    if isinstance(seeds, (int, np.integer)):
        return [int(seeds) + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} episodes")
    return seeds


def _episode_options(reset_options, n: int) -> list[dict | None]:
    if reset_options is None or isinstance(reset_options, dict):
        return [reset_options] * n
    opts = list(reset_options)
    if len(opts) != n:
        raise ValueError(f"got {len(opts)} reset_options for {n} episodes")
    return opts


def _call(env, name: str, index: int | None):
    """Call a privileged method (mujoco_state, model_xml) of a (sub-)env; None if it has none."""
    try:
        if index is None:
            fn = getattr(env.unwrapped, name, None)
            return fn() if callable(fn) else None
        if hasattr(env, "envs"):
            fn = getattr(env.envs[index].unwrapped, name, None)
            return fn() if callable(fn) else None
    except (AttributeError, NotImplementedError):
        return None
    return None


def _stack_options(options: list[dict | None]) -> dict | None:
    """Per-env reset options -> one vector-env options dict (arrays gain a leading env axis)."""
    if all(o is None for o in options):
        return None
    keys = set().union(*(o.keys() for o in options if o))
    out: dict[str, Any] = {}
    for key in keys:
        values = [(o or {}).get(key) for o in options]
        if any(v is None for v in values):
            raise ValueError(f"reset option {key!r} must be given for every episode of a vector rollout")
        if isinstance(values[0], dict):
            out[key] = {k: np.stack([np.asarray(v[k]) for v in values]) for k in values[0]}
        else:
            out[key] = np.stack([np.asarray(v) for v in values])
    return out


def _index(obs: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[i]) for k, v in obs.items()}


def rollout(
    env: gym.Env | gym.vector.VectorEnv,
    policy,
    n_episodes: int,
    seeds: int | Sequence[int] | None = None,
    reset_options: dict | Sequence[dict | None] | None = None,
    writer=None,
    steps_after_success: int = 0,
    max_steps: int | Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "rollout",
    on_step=None,
) -> RolloutResult:
    """Run `policy` for `n_episodes` episodes in `env` and return per-episode results.

    - `env`: a single `gym.Env` or a `gym.vector.VectorEnv`. A vector env runs its episodes in waves
      of `num_envs` (each wave starts with one seeded reset), so every episode's seed and options are
      honoured whatever the env's autoreset mode.
    - `policy`: the batched protocol of `policies.Policy` (`act(obs) -> (n_envs, action_dim)`,
      `reset(env_ids)`).
    - `seeds`: None, a base int (episode i gets base + i) or one seed per episode.
    - `reset_options`: one dict for all episodes or one per episode (e.g. `{"initial_observation":
      obs}` for paired starts).
    - `writer`: a `RobomimicWriter` to record every episode as a robomimic demo (attributes `success`,
      `seed`, and from a learned env `unjudged` and `max_uncertainty`).
    - `steps_after_success`: with an env that does not terminate on success, keep stepping this many
      steps after the first success, then end the episode (so success frames are not rare in data).
    - `max_steps`: end episodes after this many steps (one int, or one per episode).
    - `on_step(env_index, obs, action, reward, next_obs, info)`: optional hook (e.g. video frames).
    """
    if n_episodes <= 0:
        raise ValueError(f"n_episodes must be positive. Got {n_episodes=}")
    seed_list = _episode_seeds(seeds, n_episodes)
    limits = list(max_steps) if isinstance(max_steps, Sequence) else [max_steps] * n_episodes
    if len(limits) != n_episodes:
        raise ValueError(f"got {len(limits)} max_steps for {n_episodes} episodes")
    option_list = _episode_options(reset_options, n_episodes)
    is_vec = isinstance(env, gym.vector.VectorEnv)
    n_envs = env.num_envs if is_vec else 1
    result = RolloutResult()
    t0 = time.perf_counter()
    bar = tqdm(total=n_episodes, desc=desc, disable=not progress, unit="ep")

    for start in range(0, n_episodes, n_envs):
        wave = list(range(start, min(start + n_envs, n_episodes)))
        # pad the last wave by repeating its first episode's settings; padded envs are ignored
        slots = [wave[min(j, len(wave) - 1)] if j < len(wave) else wave[0] for j in range(n_envs)]
        if is_vec:
            wave_seeds = [seed_list[e] for e in slots]
            obs, _ = env.reset(
                seed=None if all(s is None for s in wave_seeds) else wave_seeds,
                options=_stack_options([option_list[e] for e in slots]),
            )
        else:
            obs, _ = env.reset(seed=seed_list[wave[0]], options=option_list[wave[0]])
            obs = {k: np.asarray(v)[None] for k, v in obs.items()}
        policy.reset()

        active = np.array([j < len(wave) for j in range(n_envs)])
        ret = np.zeros(n_envs)
        length = np.zeros(n_envs, dtype=np.int64)
        success = np.zeros(n_envs, dtype=bool)
        unjudged = np.zeros(n_envs, dtype=bool)
        max_uncertainty = np.full(n_envs, np.nan)
        since_success = np.zeros(n_envs, dtype=np.int64)
        buffers = [None] * n_envs
        while active.any():
            actions = np.asarray(policy.act(obs), dtype=np.float32)
            if actions.ndim != 2 or actions.shape[0] != n_envs:
                raise ValueError(f"policy.act returned shape {actions.shape}, expected ({n_envs}, action_dim)")
            states = [None] * n_envs
            if writer is not None:
                for j in np.flatnonzero(active):
                    sub = j if is_vec else None
                    states[j] = _call(env, "mujoco_state", sub)
                    if buffers[j] is None:
                        buffers[j] = writer.new_episode(model_file=_call(env, "model_xml", sub),
                                                        episode_index=wave[j])
            if is_vec:
                next_obs, reward, terminated, truncated, info = env.step(actions)
            else:
                o, r, te, tr, info = env.step(actions[0])
                next_obs = {k: np.asarray(v)[None] for k, v in o.items()}
                reward, terminated, truncated = np.array([r]), np.array([te]), np.array([tr])
                info = {k: np.array([v]) for k, v in info.items()}
            step_success = np.asarray(info.get("is_success", np.zeros(n_envs, dtype=bool)), dtype=bool)
            unjudged |= np.asarray(info.get("unjudged", np.zeros(n_envs, dtype=bool)), dtype=bool)
            reports_uncertainty = "uncertainty" in info
            if reports_uncertainty:
                max_uncertainty = np.fmax(max_uncertainty, np.asarray(info["uncertainty"], dtype=np.float64))
            result.env_steps += int(active.sum())
            for j in np.flatnonzero(active):
                ret[j] += float(reward[j])
                length[j] += 1
                if success[j]:
                    since_success[j] += 1
                success[j] |= bool(step_success[j])
                done = bool(terminated[j] or truncated[j])
                done |= success[j] and since_success[j] >= steps_after_success
                limit = limits[wave[j]]  # active envs always hold a real episode of the wave
                done |= limit is not None and length[j] >= limit
                if on_step is not None:
                    on_step(wave[j], _index(obs, j), actions[j], float(reward[j]),
                            _index(next_obs, j), {k: v[j] for k, v in info.items() if np.ndim(v) > 0})
                if writer is not None:
                    buffers[j].add_step(_index(obs, j), actions[j], float(reward[j]), done,
                                        _index(next_obs, j), states[j])
                if done:
                    active[j] = False
                    e = wave[j]
                    result.episodes.append(
                        EpisodeResult(e, seed_list[e], bool(success[j]), float(ret[j]), int(length[j]),
                                      bool(unjudged[j]), float(max_uncertainty[j]))
                    )
                    if writer is not None:
                        attrs = {} if seed_list[e] is None else {"seed": int(seed_list[e])}
                        if reports_uncertainty:  # a learned env: how sure it was, and whether it lost track
                            attrs.update(unjudged=bool(unjudged[j]), max_uncertainty=float(max_uncertainty[j]))
                        writer.write_episode(buffers[j], success=bool(success[j]), **attrs)
                        buffers[j] = None
                    bar.update(1)
                    bar.set_postfix(success=f"{np.mean([x.success for x in result.episodes]):.2f}")
            obs = next_obs
    bar.close()
    result.episodes.sort(key=lambda ep: ep.index)
    result.wall_time_s = time.perf_counter() - t0
    return result
