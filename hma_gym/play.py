"""`hma-gym play --actions LOG`: replay an action log in the learned env beside the ground truth."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from hma_gym.action_log import ActionLog
from hma_gym.envs.learned_env import HMAEnv, check_paired
from hma_gym.envs.registration import LEARNED_TASKS
from hma_gym.metrics import psnr
from hma_gym.video import label, side_by_side, write_video


def make_pair(env_id: str, env_kwargs: dict | None = None, checkpoint: str = "") -> tuple[gym.Env, gym.Env]:
    """(learned env, GT env) with identical spaces, for the learned `env_id` or a GT id with a learned twin."""
    twins = {gt: learned for learned, (gt, _) in LEARNED_TASKS.items()}
    kwargs = dict(env_kwargs or {})
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    learned_id = twins.get(env_id, env_id)
    kwargs = {k: v for k, v in kwargs.items() if k != "image_size"}
    learned = gym.make(learned_id, **kwargs)
    if not isinstance(learned.unwrapped, HMAEnv):
        raise ValueError(f"{learned_id} is not a learned env")
    env_cfg = learned.unwrapped.sim.env_config
    gt_id = env_cfg.get("gt_env_id")
    if not gt_id:
        raise ValueError(f"checkpoint {learned.unwrapped.checkpoint} names no ground-truth env (env.gt_env_id)")
    # a paired start needs every key of the model's state (e.g. robomimic's `object`): both envs return them
    keys = tuple(learned.unwrapped.sim.model_space.spaces)
    if set(keys) != set(learned.observation_space.spaces):
        learned.close()
        learned = gym.make(learned_id, **{**kwargs, "obs_keys": keys})
    gt = gym.make(gt_id, image_size=int(env_cfg["image_size"]), obs_keys=keys)
    check_paired(gt, learned)
    return learned, gt


def paired_reset(gt: gym.Env, learned: gym.Env, seed: int) -> tuple[dict, dict]:
    """DESIGN.md's paired start: the GT reset observation starts the learned env, both seeded."""
    gt_obs, _ = gt.reset(seed=seed)
    learned_obs, _ = learned.reset(seed=seed, options={"initial_observation": gt_obs})
    return gt_obs, learned_obs


def replay(log: ActionLog, learned: gym.Env, gt: gym.Env) -> dict:
    """Step both envs through the log; frames, per-step PSNR and success flags (episodes continue past success)."""
    image_key = learned.unwrapped.sim.image_key
    gt_obs, learned_obs = paired_reset(gt, learned, log.seed)
    frames = {"gt": [gt_obs[image_key]], "learned": [learned_obs[image_key]]}
    success = {"gt": [False], "learned": [False]}
    for action in log.actions:
        a = np.asarray(action, dtype=np.float32)
        for name, env in (("gt", gt), ("learned", learned)):
            obs, _, _, _, info = env.step(a)
            frames[name].append(obs[image_key])
            success[name].append(bool(info["is_success"]))
    gt_frames, learned_frames = np.stack(frames["gt"]), np.stack(frames["learned"])
    return {"gt_frames": gt_frames, "learned_frames": learned_frames, "psnr": psnr(learned_frames, gt_frames),
            "gt_success": success["gt"], "learned_success": success["learned"]}


@dataclass
class PlayConfig:
    """Replay an action log (JSON, as `serve` writes it) in the learned env and the GT env side by side."""

    actions: str
    """Action log JSON file."""
    checkpoint: str = ""
    """Learned checkpoint directory (default: the log's env_kwargs, else the shipped one)."""
    out: str = "outputs/play.mp4"
    """Side-by-side mp4 (GT left, learned right)."""
    scale: int = 4
    """Upscaling of the frames in the video."""


def play(cfg: PlayConfig) -> dict:
    log = ActionLog.load(cfg.actions)
    learned, gt = make_pair(log.env_id, log.env_kwargs, cfg.checkpoint)
    # the episode is replayed in full, past success and past the registered time limit
    result = replay(log, learned.unwrapped, gt.unwrapped)
    video = []
    for t, (g, h) in enumerate(zip(result["gt_frames"], result["learned_frames"], strict=True)):
        video.append(side_by_side([label(g, "GT", cfg.scale, result["gt_success"][t]),
                                   label(h, f"HMA {result['psnr'][t]:.1f}dB", cfg.scale, result["learned_success"][t])],
                                  scale=1))
    write_video(cfg.out, video, fps=learned.metadata.get("render_fps", 20))
    learned.close()
    gt.close()
    report = {"video": cfg.out, "steps": len(log.actions), "mean_psnr": float(np.mean(result["psnr"][1:]))
              if len(log.actions) else None, "gt_success": any(result["gt_success"]),
              "learned_success": any(result["learned_success"])}
    print(json.dumps(report, indent=2))
    return report
