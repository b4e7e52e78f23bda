"""`hma-gym evaluate`: success rate of any policy in any registered env (ground truth or learned)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

import hma_gym
from hma_gym.checkpoint import weights_hash
from hma_gym.metrics import wilson_interval
from hma_gym.video import label, write_video
from policies.registry import load_policy


def is_learned(env_id: str) -> bool:
    spec = gym.spec(env_id)
    return spec.vector_entry_point is not None and "learned_env" in str(spec.entry_point)


def gt_initial_observations(gt_env_id: str, seeds: list[int], image_size: int,
                            obs_keys: tuple[str, ...] | None = None) -> list[dict]:
    """The GT env's reset observation (of `obs_keys`, default its own) for each seed: the paired starts of a
    learned-env evaluation, which needs every key of the world model's state."""
    gt = gym.make(gt_env_id, image_size=image_size, obs_keys=obs_keys)
    starts = [gt.reset(seed=s)[0] for s in seeds]
    gt.close()
    return starts


def make_eval_env(env_id: str, num_envs: int, checkpoint: str = "", **kwargs):
    """A vector learned env (one model call per step) or a single GT env."""
    if is_learned(env_id):
        if checkpoint:
            kwargs["checkpoint"] = checkpoint
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    if checkpoint:
        raise ValueError(f"{env_id} is a ground-truth env; --checkpoint applies to learned envs")
    return gym.make(env_id, **kwargs)


@dataclass
class EvaluateConfig:
    """Evaluate a policy for N seeded episodes in a registered env and write a JSON report."""

    policy: str
    """expert, random, dp-lift, a Diffusion Policy checkpoint directory, or sb3:ALGO:PATH."""
    env: str = "RobomimicLift-v0"
    """Registered env id (ground truth or learned, e.g. HMA-RobomimicLift-v0)."""
    episodes: int = 50
    """Number of episodes."""
    seed: int = 10_000
    """Episode i uses seed + i (held out from collection seeds 0..n)."""
    num_envs: int = 16
    """Envs stepped together in a learned env (one batched model call per step)."""
    checkpoint: str = ""
    """Learned env checkpoint directory (default: the id's)."""
    paired: bool = True
    """Learned env: start each episode from the GT env's reset observation for the same seed."""
    out: str = "outputs/evaluate.json"
    """JSON report."""
    videos: int = 0
    """Record this many episodes to mp4 (next to the report)."""
    policy_seed: int = 0
    """Seed of the policy's own sampling."""
    trust_pickle: bool = False
    """sb3:ALGO:PATH only: load the zip with SB3's own loader, which unpickles it and so runs any code it holds
    (files you trust only); by default PPO/A2C/SAC/TD3/DDPG zips are rebuilt from their state dict."""
    compile: bool = False
    """Learned env: torch.compile the world model (a minute of compiling, then faster steps)."""
    uncertainty_limit: float | None = None
    """Learned env: a step whose uncertainty passes this is outside the model's competence, and its episode is
    counted as unjudged (default: the checkpoint's calibrated generation.uncertainty_limit, if any)."""
    end_unjudged: bool = False
    """Learned env: end unjudged episodes there, unscored, instead of running them on (the report's
    judged_success_rate leaves them out either way)."""

    def __post_init__(self):
        for flag, used in (("--compile", self.compile), ("--uncertainty-limit", self.uncertainty_limit is not None),
                           ("--end-unjudged", self.end_unjudged)):
            if used and not is_learned(self.env):
                raise ValueError(f"{flag} applies to learned envs; {self.env} is a ground-truth env")
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive. Got {self.episodes=}")
        if self.num_envs <= 0:
            raise ValueError(f"num_envs must be positive. Got {self.num_envs=}")


def evaluate(cfg: EvaluateConfig) -> dict:
    hma_gym.register_envs()
    learned = is_learned(cfg.env)
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    extra = {"compile": True} if cfg.compile else {}
    if cfg.uncertainty_limit is not None:
        extra["uncertainty_limit"] = cfg.uncertainty_limit
    if cfg.end_unjudged:
        extra["end_unjudged"] = True
    env = make_eval_env(cfg.env, min(cfg.num_envs, cfg.episodes) if learned else 1, cfg.checkpoint, **extra)
    policy = load_policy(cfg.policy, env, seed=cfg.policy_seed, trust_pickle=cfg.trust_pickle)
    reset_options = None
    if learned and cfg.paired:
        sim = env.unwrapped.sim
        starts = gt_initial_observations(sim.env_config["gt_env_id"], seeds, int(sim.env_config["image_size"]),
                                         tuple(sim.model_space.spaces))
        reset_options = [{"initial_observation": s} for s in starts]
    image_key = "agentview_image"
    frames: dict[int, list[np.ndarray]] = {}

    def record(i, obs, action, reward, next_obs, info):
        if i is not None and i < cfg.videos:
            if i not in frames:
                frames[i] = [obs[image_key]]
            frames[i].append(next_obs[image_key])

    t0 = time.perf_counter()
    result = hma_gym.rollout(env, policy, cfg.episodes, seeds=seeds, reset_options=reset_options,
                             desc=f"{cfg.policy} @ {cfg.env}", on_step=record if cfg.videos else None)
    wall = time.perf_counter() - t0
    successes = sum(e.success for e in result.episodes)
    low, high = wilson_interval(successes, cfg.episodes)
    report = {
        "policy": cfg.policy,
        "env": cfg.env,
        "learned": learned,
        "checkpoint": str(env.unwrapped.sim.checkpoint) if learned else None,
        "checkpoint_weights_hash": weights_hash(env.unwrapped.sim.checkpoint) if learned else None,
        "episodes": cfg.episodes,
        "seeds": [seeds[0], seeds[-1]],
        "success_rate": result.success_rate,
        "success_ci95": [low, high],
        "unjudged": result.unjudged if learned else None,
        "judged_success_rate": result.judged_success_rate if learned else None,
        "uncertainty_limit": env.unwrapped.sim.uncertainty_limit if learned else None,
        "mean_length": result.mean_length,
        "env_steps": result.env_steps,
        "wall_time_s": wall,
        "steps_per_s": result.env_steps / wall,
        "per_episode": [asdict(e) for e in result.episodes],
        "config": asdict(cfg),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    videos = []
    for i, fr in sorted(frames.items()):
        path = out.with_name(f"{out.stem}_ep{i}.mp4")
        write_video(path, [label(f, f"{cfg.env} ep{i} t={t}", 4) for t, f in enumerate(fr)],
                    fps=env.metadata.get("render_fps", 20))
        videos.append(str(path))
    report["videos"] = videos
    out.write_text(json.dumps(report, indent=2) + "\n")
    env.close()
    print(json.dumps({k: v for k, v in report.items() if k not in ("per_episode", "config")}, indent=2))
    return report

