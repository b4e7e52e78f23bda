"""Learned sims against MuJoCo from paired starts: a policy's GT episodes replayed, action for action, in
each learned env from the same initial observation; per-frame PSNR against the GT frames.

    python -m benchmarks.paired_psnr --episodes 10 --variants maskgit mar maskgit:greedy mar:sample

A variant is a shipped checkpoint ("maskgit", "mar", "fast", "fsq15k") or a packed checkpoint directory (e.g.
runs/ckpt), with its own generation settings, or with ":greedy" (argmax codes / noise-free DDIM) or ":sample"
(temperature-1 sampling) forced: `--variants maskgit runs/my_ckpt runs/my_ckpt:greedy`.

Unlike `eval-model` (8 frames after 4 GT prompt frames from held-out data), this is the env as a user
runs it: one GT frame to start from, then whole episodes generated from the model's own outputs. The
"hold the first frame" row is the baseline that never moves. Writes benchmarks/results/paired_psnr.json.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

import hma_gym  # noqa: F401
from benchmarks.common import learned_env_kwargs, write_result
from hma_gym.action_log import ActionLog
from hma_gym.metrics import psnr
from hma_gym.play import make_pair, replay
from hma_gym.rollout import rollout
from policies.registry import load_policy

HORIZONS = (8, 32)


def gt_episodes(gt: gym.Env, policy, seeds: list[int], max_steps: int) -> list[ActionLog]:
    """The policy's actions in the GT env from reset(seed), one log per seed, until each episode ends or
    max_steps (the project's rollout loop)."""
    actions: list[list] = [[] for _ in seeds]
    rollout(gt, policy, len(seeds), seeds=seeds, max_steps=max_steps, progress=False,
            on_step=lambda e, obs, action, *_: actions[e].append(action.tolist()))
    return [ActionLog(env_id=gt.spec.id, seed=seed, actions=a) for seed, a in zip(seeds, actions, strict=True)]


DECODING = {"": {}, "greedy": {"greedy": True}, "sample": {"greedy": False, "temperature": 1.0}}


def env_kwargs(spec: str) -> dict:
    """"mar" -> {"variant": "mar"}; "mar:greedy" -> {"variant": "mar", "greedy": True}; ":sample" likewise;
    "runs/ckpt[:greedy]" (a directory) -> {"checkpoint": "runs/ckpt"[, "greedy": True]}."""
    target, sep, decoding = spec.rpartition(":")
    if not sep:
        target, decoding = spec, ""
    elif not decoding or decoding not in DECODING:
        raise ValueError(f"{spec!r}: decoding must be one of {sorted(k for k in DECODING if k)}")
    return {**learned_env_kwargs(target), **DECODING[decoding]}


def summary(per_frame: list[np.ndarray]) -> dict:
    """Mean PSNR over frames 1..h of every episode (h in HORIZONS, then all), pooled over episodes."""
    out = {}
    for h in (*HORIZONS, None):
        vals = np.concatenate([p[1 : None if h is None else h + 1] for p in per_frame])
        out[f"psnr_frames_1_{h}" if h else "psnr_all_frames"] = float(vals.mean())
    out["psnr_per_episode"] = [float(p[1:].mean()) for p in per_frame]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["maskgit", "mar"],
                        help="shipped checkpoints (maskgit, mar) or checkpoint directories, each optionally "
                             ":greedy or :sample")
    parser.add_argument("--policy", default="expert", help="policy whose GT episodes are replayed")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=20000, help="episode i uses seed + i")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--name", default="paired_psnr")
    args = parser.parse_args(argv)
    pairs = {v: make_pair("HMA-RobomimicLift-v0", env_kwargs(v)) for v in args.variants}
    gt = next(iter(pairs.values()))[1]
    policy = load_policy(args.policy, gt, seed=0)
    logs = gt_episodes(gt, policy, [args.seed + i for i in range(args.episodes)], args.max_steps)
    rows, hold = [], []
    for variant, (learned, gt_env) in pairs.items():
        per_frame = []
        for log in logs:
            result = replay(log, learned, gt_env)
            per_frame.append(result["psnr"])
            if variant == args.variants[0]:  # the baseline: the first GT frame held still
                frames = result["gt_frames"]
                hold.append(psnr(np.repeat(frames[:1], len(frames), axis=0), frames))
        sim = learned.unwrapped.sim
        rows.append({"sim": variant, "checkpoint": str(learned.unwrapped.checkpoint),
                     "generation": {"steps": sim.steps, "greedy": sim.greedy, "temperature": sim.temperature},
                     **summary(per_frame)})
        print(f"{variant:16s} " + " ".join(f"{k}={v:.2f}" for k, v in rows[-1].items() if k.startswith("psnr_f")
                                           or k == "psnr_all_frames"))
    rows.append({"sim": "hold the first frame", **summary(hold)})
    payload = {"policy": args.policy, "episodes": args.episodes, "seeds": [log.seed for log in logs],
               "episode_lengths": [len(log.actions) for log in logs], "rows": rows}
    write_result(args.name, payload, module="paired_psnr")
    return payload


if __name__ == "__main__":
    main()
