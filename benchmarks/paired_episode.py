"""One policy episode from the same start in the GT env and (paired reset) in the learned env, as a
film strip: top row MuJoCo, bottom row the learned sim, a frame every 8 steps, until each episode ends.

    python -m benchmarks.paired_episode --policy runs/dp_lift/iter_300 --seed 20000 \\
        --out benchmarks/results/paired_episode_iter300_s20000

Writes OUT.png (the strip) and OUT.json (length, verdict, success probabilities and gripper width per
step in each sim), to see where and how the learned sim's verdict departs from the ground truth's.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image

import hma_gym
from hma_gym.play import make_pair
from policies.registry import load_policy


def run(env, spec: str, seed: int, start: dict | None = None) -> tuple[list[np.ndarray], dict]:
    """One episode of the policy through the project's rollout loop, from `start` when given."""
    policy = load_policy(spec, env, seed=0)
    frames, probs, width = [], [], []

    def record(i, obs, action, reward, next_obs, info):
        if not frames:
            frames.append(obs["agentview_image"])
        frames.append(next_obs["agentview_image"])
        width.append(float(next_obs["robot0_gripper_qpos"][0] - next_obs["robot0_gripper_qpos"][1]))
        probs.append(float(info.get("success_prob", float(info["is_success"]))))

    options = None if start is None else [{"initial_observation": start}]
    result = hma_gym.rollout(env, policy, 1, seeds=[seed], reset_options=options, progress=False, on_step=record)
    episode = result.episodes[0]
    return frames, {"length": episode.length, "success": bool(episode.success), "success_prob": probs,
                    "gripper_width": width}


def strip(frames: list[np.ndarray], every: int, n: int) -> np.ndarray:
    picked = frames[::every][:n]
    return np.concatenate(picked + [np.zeros_like(picked[0])] * (n - len(picked)), axis=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--seed", type=int, default=20_000)
    parser.add_argument("--env", default="HMA-RobomimicLift-v0")
    parser.add_argument("--every", type=int, default=8, help="a frame every n steps")
    parser.add_argument("--out", required=True, help="path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    learned, gt = make_pair(args.env)
    gt_frames, gt_info = run(gt, args.policy, args.seed)
    # the paired start: the learned env begins from the GT env's reset observation of the same seed
    learned_frames, learned_info = run(learned, args.policy, args.seed, start=gt.reset(seed=args.seed)[0])
    n = (max(len(gt_frames), len(learned_frames)) + args.every - 1) // args.every
    image = np.concatenate([strip(gt_frames, args.every, n), strip(learned_frames, args.every, n)], axis=0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(args.out + ".png")
    report = {"command": "python -m benchmarks.paired_episode " + " ".join(argv or sys.argv[1:]),
              "policy": args.policy, "seed": args.seed, "gt": gt_info, "learned": learned_info}
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print({k: (v["length"], v["success"]) for k, v in (("gt", gt_info), ("learned", learned_info))})
    return report


if __name__ == "__main__":
    main()
