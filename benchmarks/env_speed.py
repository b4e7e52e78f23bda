"""Env speed: ground-truth env steps/s with the camera at several sizes and without it.

    python -m benchmarks.env_speed [--steps 200]

Writes benchmarks/results/env_speed.json. All rows are measured in one run, side by side, so their
ratios are meaningful on a shared, noisy machine; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import hma_gym  # noqa: F401
from benchmarks.common import write_result


def time_steps(env, steps: int, seed: int = 0) -> float:
    """Mean steps/s over `steps` random actions (resets excluded from the timing)."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    for _ in range(5):  # warm-up
        env.step(rng.uniform(-1, 1, 7).astype(np.float32))
    elapsed, done = 0.0, 0
    while done < steps:
        action = rng.uniform(-1, 1, 7).astype(np.float32)
        t0 = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        elapsed += time.perf_counter() - t0
        done += 1
        if terminated or truncated:
            env.reset()
    return done / elapsed


def gt_rows(steps: int) -> list[dict]:
    configs = [
        ("gt-no-camera", dict(use_camera=False)),
        ("gt-64px", dict(image_size=64)),
        ("gt-84px", dict(image_size=84)),
        ("gt-128px", dict(image_size=128)),
        ("gt-84px-robosuite-default-render", dict(image_size=84, fast_render=False)),
    ]
    rows = []
    for name, kwargs in configs:
        env = gym.make("RobomimicLift-v0", **kwargs)
        sps = time_steps(env, steps)
        env.close()
        rows.append({"env": name, "kwargs": kwargs, "steps_per_s": sps, "ms_per_step": 1000 / sps})
        print(f"{name:40s} {sps:8.1f} steps/s  {1000 / sps:6.1f} ms/step")
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    args = parser.parse_args(argv)
    rows = gt_rows(args.steps)
    base = next(r for r in rows if r["env"] == "gt-64px")["steps_per_s"]
    for r in rows:
        r["ratio_to_gt_64px"] = r["steps_per_s"] / base
    payload = {"steps": args.steps, "rows": rows}
    write_result("env_speed", payload)
    return payload


if __name__ == "__main__":
    main()
