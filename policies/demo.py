"""`hma-gym demo`: the README's main job.

Runs a policy for a few paired episodes in the ground-truth env and in the learned env (each learned
episode starts from the GT reset observation of the same seed), prints both success rates and both
speeds, and writes a side-by-side mp4 (GT left, learned right).

The policy is the shipped Diffusion Policy `dp-lift` when it is installed; otherwise the scripted expert
runs in the GT env and its actions are replayed open-loop in the learned env (the expert needs
privileged state, which a learned env does not have).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

import hma_gym
from hma_gym.action_log import ActionLog
from hma_gym.play import make_pair, replay
from hma_gym.video import label, side_by_side, write_video
from policies.registry import load_policy


def shipped_dp_available() -> bool:
    from pathlib import Path

    return (Path(__file__).resolve().parent / "assets" / "dp_lift" / "policy.json").exists()


@dataclass
class DemoConfig:
    """Paired GT-vs-learned episodes of a policy, with a side-by-side video."""

    policy: str = "auto"
    """dp-lift, expert, or any evaluate policy spec; auto = dp-lift when shipped, else expert."""
    trust_pickle: bool = False
    """sb3:ALGO:PATH only: load the zip with SB3's own loader, which unpickles it and so runs any code it holds
    (files you trust only); by default PPO/A2C/SAC/TD3/DDPG zips are rebuilt from their state dict."""
    episodes: int = 4
    """Paired episodes."""
    seed: int = 10_000
    """Base seed of the episodes (held out from the collection seeds 0..n)."""
    checkpoint: str = ""
    """Learned env checkpoint (default: the shipped one)."""
    video: str = "outputs/demo.mp4"
    """Side-by-side video path."""


def _closed_loop(env, policy, seeds, options):
    frames, result = {}, None

    def record(i, obs, action, reward, nxt, info):
        frames.setdefault(i, [obs["agentview_image"]]).append(nxt["agentview_image"])

    result = hma_gym.rollout(env, policy, len(seeds), seeds=seeds, reset_options=options, on_step=record,
                             progress=False)
    return result, [frames[i] for i in range(len(seeds))]


def demo(cfg: DemoConfig) -> dict:
    spec = cfg.policy if cfg.policy != "auto" else ("dp-lift" if shipped_dp_available() else "expert")
    learned, gt = make_pair("HMA-RobomimicLift-v0", checkpoint=cfg.checkpoint)
    learned, gt = learned.unwrapped, gt.unwrapped
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    starts = [gt.reset(seed=s)[0] for s in seeds]
    options = [{"initial_observation": s} for s in starts]
    limit = gym.spec("RobomimicLift-v0").max_episode_steps
    gt_env = gym.wrappers.TimeLimit(gt, limit)
    learned_env = gym.wrappers.TimeLimit(learned, limit)
    report: dict = {"policy": spec, "episodes": cfg.episodes, "seeds": seeds}
    if spec in ("expert", "lift-expert"):
        actions: dict[int, list] = {}
        gt_result = hma_gym.rollout(gt_env, load_policy("expert", gt_env), len(seeds), seeds=seeds, progress=False,
                                    on_step=lambda i, o, a, r, n, info: actions.setdefault(i, []).append(a))
        learned_frames, gt_frames, learned_success = [], [], []
        for i, s in enumerate(seeds):
            out = replay(ActionLog("HMA-RobomimicLift-v0", s, [list(map(float, a)) for a in actions[i]]),
                         learned, gt)
            learned_frames.append(out["learned_frames"])
            gt_frames.append(out["gt_frames"])
            learned_success.append(any(out["learned_success"]))
        # replay() steps both sims; time the learned env alone for its speed
        t_learned = _time_learned(learned, actions[0], seeds[0], starts[0])
        report.update(mode="expert in GT, its actions replayed open-loop in the learned env",
                      gt_success_rate=gt_result.success_rate, learned_success_rate=float(np.mean(learned_success)),
                      gt_steps_per_s=gt_result.steps_per_s, learned_steps_per_s=t_learned)
    else:
        policy = load_policy(spec, gt_env, trust_pickle=cfg.trust_pickle)
        gt_result, gt_frames = _closed_loop(gt_env, policy, seeds, None)
        policy = load_policy(spec, learned_env, trust_pickle=cfg.trust_pickle)
        learned_result, learned_frames = _closed_loop(learned_env, policy, seeds, options)
        report.update(mode="closed loop in both envs from paired starts",
                      gt_success_rate=gt_result.success_rate, learned_success_rate=learned_result.success_rate,
                      gt_steps_per_s=gt_result.steps_per_s, learned_steps_per_s=learned_result.steps_per_s)
    video = []
    for g_frames, l_frames in zip(gt_frames, learned_frames, strict=True):
        for t in range(max(len(g_frames), len(l_frames))):
            g = g_frames[min(t, len(g_frames) - 1)]
            h = l_frames[min(t, len(l_frames) - 1)]
            video.append(side_by_side([label(g, f"MuJoCo t={t}"), label(h, "HMA (learned)")], scale=1))
    write_video(cfg.video, video, fps=20)
    report["video"] = cfg.video
    report["checkpoint"] = str(learned.checkpoint)
    print(json.dumps(report, indent=2))
    return report


def _time_learned(learned, actions, seed, start) -> float:
    learned.reset(seed=seed, options={"initial_observation": start})
    t0 = time.perf_counter()
    for a in actions:
        learned.step(np.asarray(a, np.float32))
    return len(actions) / (time.perf_counter() - t0)
