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

import numpy as np
import torch
from PIL import Image

from hma_gym.play import make_pair, paired_reset
from policies.registry import load_policy


def run(env, obs, spec: str, max_steps: int = 100) -> tuple[list[np.ndarray], dict]:
    policy = load_policy(spec, env, seed=0)
    policy.reset()
    frames, probs, width = [obs["agentview_image"]], [], []
    success = False
    for _ in range(max_steps):
        action = policy.act({k: v[None] for k, v in obs.items()})[0]
        obs, _, terminated, truncated, info = env.step(action)
        frames.append(obs["agentview_image"])
        width.append(float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1]))
        probs.append(float(info.get("success_prob", float(info["is_success"]))))
        success = bool(info["is_success"])
        if terminated or truncated:
            break
    return frames, {"length": len(frames) - 1, "success": success, "success_prob": probs, "gripper_width": width}


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
    gt_obs, learned_obs = paired_reset(gt, learned, args.seed)
    gt_frames, gt_info = run(gt, gt_obs, args.policy)
    learned_frames, learned_info = run(learned, learned_obs, args.policy)
    n = (max(len(gt_frames), len(learned_frames)) + args.every - 1) // args.every
    image = np.concatenate([strip(gt_frames, args.every, n), strip(learned_frames, args.every, n)], axis=0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(args.out + ".png")
    report = {"command": "python -m benchmarks.paired_episode " + " ".join(argv or __import__("sys").argv[1:]),
              "policy": args.policy, "seed": args.seed, "gt": gt_info, "learned": learned_info}
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print({k: (v["length"], v["success"]) for k, v in (("gt", gt_info), ("learned", learned_info))})
    return report


if __name__ == "__main__":
    main()
