"""`hma-gym calibrate-success`: choose the learned env's success rule on held-out episodes.

The success detector is trained on ground-truth frames; the learned env shows it generated ones, where
artefacts can look like a lifted cube for a frame or two, and an episode ends at its first detection.
So the episode-level decision ("did the episode succeed?") is calibrated in the learned env itself:
each held-out episode of a robomimic file is replayed open loop (its true actions, from its first
observation) in the batched learned env, the detector's probability is recorded at every step, and
every rule "probability >= threshold on k frames in a row" is scored against the episodes' ground-truth
outcomes. The rule with the best balanced accuracy (ties: higher accuracy, fewer frames, then the
threshold nearest the detector's own) is reported and, with `--write`, stored in the checkpoint's `generation` settings,
which the learned env reads.

A checkpoint whose world model predicts the task's object state is scored by the task's predicate on that
state instead (no rule to choose); for it the report gives that verdict's agreement with the episodes' true
outcomes. For every checkpoint the per-step uncertainty (`info["uncertainty"]`) of these in-distribution
replays is recorded; the `uncertainty_quantile` quantile of each episode's largest step becomes
`generation.uncertainty_limit`: the level above which a step is outside what the model saw in training (its
episode is unjudged). An episode is unjudged by its worst step, so the limit is a quantile over episodes, not
over steps: at 0.95, about 1 in 20 in-distribution episodes is unjudged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import hma_gym
from hma_gym.checkpoint import load_json, save_json
from hma_gym.envs.learned_env import HMAVectorEnv, checkpoint_state_keys, default_checkpoint
from hma_gym.metrics import binary_metrics
from policies.base import ReplayPolicy
from training.data import DataConfig, Episode, load_episodes


@dataclass
class CalibrateConfig(DataConfig):
    """Calibrate the learned env's success rule (threshold, frames in a row) on held-out episodes."""

    checkpoint: str = ""
    """Packed checkpoint directory (empty: the shipped Lift checkpoint)."""
    split: str = "valid"
    """Episodes to replay: the file's held-out split (valid) or train."""
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    """Candidate probability thresholds."""
    max_frames: int = 5
    """Candidate rules need the probability on 1..max_frames frames in a row."""
    repeats: int = 1
    """Replays of every episode (different sampling seeds) pooled into the score."""
    seed: int = 0
    """Sampling seed of the first replay."""
    out: str = "outputs/calibrate_success.json"
    """JSON report path."""
    uncertainty_quantile: float = 0.95
    """Quantile of the replayed episodes' largest per-step uncertainty taken as the checkpoint's
    uncertainty_limit (the share of in-distribution episodes that stay judged)."""
    write: bool = False
    """Store the chosen rule (generation.success_threshold/_frames; for detector checkpoints) and the
    uncertainty limit (generation.uncertainty_limit) in the checkpoint's config.json."""
    device: str = "cpu"
    """cpu or cuda."""
    progress: bool = True
    """Show progress bars."""


def first_run(hits: np.ndarray, k: int) -> np.ndarray:
    """(N, T) bool -> (N,) bool: some k consecutive True values in each row."""
    streak = np.zeros(hits.shape[0], dtype=np.int64)
    found = np.zeros(hits.shape[0], dtype=bool)
    for t in range(hits.shape[1]):
        streak = np.where(hits[:, t], streak + 1, 0)
        found |= streak >= k
    return found


def replay_probabilities(env, episodes: list[Episode], seed: int, progress: bool = True,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Replay every episode's actions from its first observation through the rollout loop, in a batched
    learned env with one row per episode (made with `terminate_on_success=False`).

    Returns the success probability and the uncertainty (N, T) of each step, NaN past an episode's end.
    """
    sim = env.sim

    def first_observation(e: Episode) -> dict:
        return {sim.image_key: e.frames[0], **{k: v[0] for k, v in sim.split_state(e.states[:1]).items()}}

    starts = [{"initial_observation": first_observation(e)} for e in episodes]
    lengths = [len(e.actions) for e in episodes]
    action_dim = env.single_action_space.shape[0]
    probs = np.full((len(episodes), max(lengths)), np.nan, dtype=np.float32)
    uncertainty = np.full_like(probs, np.nan)
    t = np.zeros(len(episodes), dtype=np.int64)

    def record(i, obs, action, reward, next_obs, info):
        probs[i, t[i]] = info["success_prob"]
        uncertainty[i, t[i]] = info["uncertainty"]
        t[i] += 1

    hma_gym.rollout(env, ReplayPolicy([e.actions[:, :action_dim] for e in episodes]), len(episodes),
                    seeds=[seed + i for i in range(len(episodes))], reset_options=starts,
                    steps_after_success=10**9, max_steps=lengths, progress=progress,
                    desc="replay held-out episodes", on_step=record)
    return probs, uncertainty


def score_rules(probs: np.ndarray, labels: np.ndarray, thresholds, max_frames: int) -> list[dict]:
    rows = []
    for threshold in thresholds:
        hits = np.nan_to_num(probs, nan=0.0) >= threshold
        for k in range(1, max_frames + 1):
            pred = first_run(hits, k)
            rows.append({"threshold": float(threshold), "frames": k, **binary_metrics(pred, labels)})
    return rows


def choose(rows: list[dict], detector_threshold: float) -> dict:
    return max(rows, key=lambda r: (round(r["balanced_accuracy"], 6), round(r["accuracy"], 6), -r["frames"],
                                    -abs(r["threshold"] - detector_threshold)))


def calibrate_success(cfg: CalibrateConfig) -> dict:
    checkpoint = cfg.checkpoint or str(default_checkpoint())
    if cfg.split not in ("valid", "train"):
        raise ValueError(f"split must be valid or train. Got {cfg.split=}")
    if cfg.repeats < 1 or cfg.max_frames < 1:
        raise ValueError("repeats and max_frames must be >= 1")
    if not 0 < cfg.uncertainty_quantile <= 1:
        raise ValueError(f"uncertainty_quantile must be in (0, 1]. Got {cfg.uncertainty_quantile=}")
    data = DataConfig(**{k: getattr(cfg, k) for k in DataConfig.__dataclass_fields__})
    config = load_json(Path(checkpoint) / "config.json")
    data.image_size = int(config["env"]["image_size"])
    data.proprio_keys = tuple(k for k, _ in checkpoint_state_keys(config))  # e.g. with `object`
    episodes = load_episodes(data, cfg.split, progress=cfg.progress)
    labels = np.array([bool(e.success.any()) for e in episodes])
    # one row per episode; the success rule is not applied (episodes run to their end)
    env = HMAVectorEnv(num_envs=len(episodes), checkpoint=checkpoint, device=cfg.device, terminate_on_success=False,
                       max_episode_steps=10**9, uncertainty_limit=float("inf"))
    wm, state_verdict = env.sim.wm, env.sim.object_task is not None
    runs = [replay_probabilities(env, episodes, cfg.seed + 1000 * r, cfg.progress) for r in range(cfg.repeats)]
    env.close()
    probs = np.concatenate([p for p, _ in runs])
    uncertainty = np.concatenate([u for _, u in runs])
    labels_all = np.tile(labels, cfg.repeats)
    limit = float(np.nanquantile(np.nanmax(uncertainty, axis=1), cfg.uncertainty_quantile))
    if state_verdict:  # the task's predicate on the predicted state: one frame, probability 0 or 1
        rows = score_rules(probs, labels_all, (0.5,), 1)
        best = default = rows[0]
    else:
        rows = score_rules(probs, labels_all, cfg.thresholds, cfg.max_frames)
        best = choose(rows, wm.threshold)
        default = next((r for r in rows if r["frames"] == 1 and abs(r["threshold"] - wm.threshold) < 1e-9), None)
    report = {
        "checkpoint": checkpoint,
        "data": cfg.data,
        "extra_data": list(cfg.extra_data),
        "split": cfg.split,
        "episodes": len(episodes),
        "successful_episodes": int(labels.sum()),
        "repeats": cfg.repeats,
        "verdict": "object-state predicate" if state_verdict else "detector",
        "detector_threshold": None if state_verdict else wm.threshold,
        "chosen": best,
        "uncertainty_limit": limit,
        "uncertainty_quantile": cfg.uncertainty_quantile,
        "uncertainty_by_outcome": {name: float(np.nanmean(uncertainty[labels_all == value]))
                                   for name, value in (("successful", True), ("failed", False))
                                   if (labels_all == value).any()},
        "single_frame_at_detector_threshold": default,
        "rules": rows,
        "config": asdict(cfg),
    }
    if cfg.write:
        config_path = Path(checkpoint) / "config.json"
        config = load_json(config_path)
        generation = config.setdefault("generation", {})
        generation["uncertainty_limit"] = limit
        if not state_verdict:
            generation.update({"success_threshold": best["threshold"], "success_frames": best["frames"]})
        config.setdefault("provenance", {})["success_calibration"] = {
            k: report[k] for k in ("data", "extra_data", "split", "episodes", "successful_episodes", "repeats")} | {
            "balanced_accuracy": best["balanced_accuracy"], "accuracy": best["accuracy"]}
        save_json(config_path, config)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("checkpoint", "episodes", "successful_episodes", "verdict", "chosen",
                                              "single_frame_at_detector_threshold", "uncertainty_limit")}, indent=2))
    return report
