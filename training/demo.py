"""`hma-gym demo`: the README's main job.

Runs the scripted Lift expert in the ground-truth env for a few seeded episodes, prints its success
rate and speed, and writes an mp4 of the rollouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gymnasium as gym

import hma_gym
from hma_gym.video import write_video
from policies.scripted import LiftExpert


@dataclass
class DemoConfig:
    """Evaluate the shipped policies in the GT env (and the learned env once one ships)."""

    episodes: int = 4
    """Episodes to run."""
    seed: int = 10_000
    """Base seed of the episodes (held out from the collection seeds 0..n)."""
    video: str = "outputs/demo.mp4"
    """Where to write the video."""


def demo(cfg: DemoConfig) -> dict:
    env = gym.make("RobomimicLift-v0", render_mode="rgb_array")
    frames = []
    result = hma_gym.rollout(env, LiftExpert(env, seed=cfg.seed), cfg.episodes, seeds=cfg.seed,
                             on_step=lambda i, obs, a, r, nxt, info: frames.append(nxt["agentview_image"]))
    env.close()
    write_video(cfg.video, [f.repeat(4, 0).repeat(4, 1) for f in frames], fps=20)
    report = {"env": "RobomimicLift-v0", "policy": "lift-expert", **{k: v for k, v in result.to_dict().items()
                                                                     if k != "per_episode"}, "video": cfg.video}
    print(json.dumps(report, indent=2))
    return report
