"""Do the learned env's frames show the gripper and the cube where its predicted state puts them?

    python -m benchmarks.frame_state_consistency --data data/lift.hdf5 data/mix/dp_shipped.hdf5 ...
        [--checkpoint DIR | --variant V] [--policies dp_lift expert ...] [--episodes 50] [--seed 900000]

The verdict comes from the predicted state; an image policy acts on the predicted frames. Where the two
disagree, the policy aims at a gripper or cube the verdict does not know, and its score says little about
MuJoCo. This measures the disagreement with a probe: a small CNN that reads the gripper position and the cube
position from one 64x64 frame, trained on ground-truth frames of collected files (their `robot0_eef_pos` and
`object` keys; the last `--probe-valid` episodes of each file held out). Its error on held-out GT frames is
the floor. Each policy of the verdict bank then runs closed loop in the learned env from the bank's paired
starts (`verdict_agreement.run_gt`), and at every step where the predicted gripper is within `--near` of the
predicted cube (where a grasp is aimed, and where the gripper is in view) the probe's reading of the frame is
compared with the predicted state: gripper, cube and gripper-to-cube vector, mean |frame - state| per axis
(cm), beside the probe's floor on held-out GT frames in the same region. Per episode it also records the
mean gripper-to-cube disagreement in the plane and whether the learned verdict matched MuJoCo's, so one can
see whether misjudged episodes are the inconsistent ones.

Writes benchmarks/results/RESULT.json.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import h5py
import numpy as np
import torch
from torch import nn

import hma_gym
from benchmarks.common import learned_env_kwargs, write_result
from benchmarks.verdict_agreement import BANK, parse_policies, run_gt
from hma_gym.checkpoint import weights_hash
from hma_gym.envs.learned_env import predicted_keys
from hma_gym.envs.robosuite_env import DEFAULT_PROPRIO_KEYS
from hma_gym.tasks import OBJECT_KEY
from policies.registry import load_policy

EEF_KEY = "robot0_eef_pos"


class Probe(nn.Module):
    """uint8 frames (B, H, W, 3) -> (B, 6): gripper xyz and cube xyz in metres (targets normalised inside)."""

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.GELU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.GELU(), nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * w, 256), nn.GELU(), nn.Linear(256, 6))
        self.register_buffer("mean", torch.as_tensor(np.zeros(6) if mean is None else mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.ones(6) if std is None else std, dtype=torch.float32))

    def normalised(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames.permute(0, 3, 1, 2).float() / 255.0)

    @torch.no_grad()
    def read(self, frames: np.ndarray, batch: int = 512) -> np.ndarray:
        """uint8 frames (B, H, W, 3) -> (B, 6) positions in metres."""
        self.eval()
        out = [self.normalised(torch.from_numpy(np.ascontiguousarray(frames[i:i + batch]))) * self.std + self.mean
               for i in range(0, len(frames), batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, 6), np.float32)


def fit_probe(frames: np.ndarray, targets: np.ndarray, steps: int, batch: int = 128, lr: float = 2e-3,
              seed: int = 0, width: int = 32, progress: bool = True) -> Probe:
    """Train a probe on uint8 frames (N, H, W, 3) and their positions (N, 6) by MSE on normalised targets."""
    if len(frames) != len(targets) or len(frames) == 0:
        raise ValueError(f"fit_probe needs as many targets as frames, and some: {len(frames)} vs {len(targets)}")
    torch.manual_seed(seed)
    mean, std = targets.mean(0), targets.std(0) + 1e-6
    probe = Probe(mean, std, width)
    x, y = torch.from_numpy(frames), torch.from_numpy(((targets - mean) / std).astype(np.float32))
    opt = torch.optim.AdamW(probe.parameters(), lr / 2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    for step in range(steps):
        i = torch.randint(len(x), (min(batch, len(x)),), generator=gen)
        loss = ((probe.normalised(x[i]) - y[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % 1000 == 0:
            print(f"probe step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return probe.eval()


def read_frames(paths: list[str], per_demo: int, max_demos: int, valid: int, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `per_demo` random frames of the first `max_demos` episodes of each file, with (gripper xyz, cube xyz)
    and a held-out flag (the last `valid` of those episodes per file)."""
    rng = np.random.default_rng(seed)
    frames, targets, held = [], [], []
    for path in paths:
        with h5py.File(path, "r") as f:
            names = sorted(f["data"], key=lambda k: int(k.rsplit("_", 1)[1]))[:max_demos]
            if len(names) <= valid:
                raise ValueError(f"{path}: {len(names)} episodes, need more than --probe-valid {valid}")
            for j, name in enumerate(names):
                obs = f["data"][name]["obs"]
                if OBJECT_KEY not in obs:
                    raise ValueError(f"{path}/{name} has no {OBJECT_KEY!r} observation (collect records it)")
                n = len(obs[EEF_KEY])
                idx = np.sort(rng.choice(n, min(n, per_demo), replace=False))
                frames.append(obs["agentview_image"][idx])
                targets.append(np.concatenate([obs[EEF_KEY][idx], obs[OBJECT_KEY][idx, :3]], 1))
                held.append(np.full(len(idx), j >= len(names) - valid))
    return np.concatenate(frames), np.concatenate(targets).astype(np.float32), np.concatenate(held)


def errors(read: np.ndarray, true: np.ndarray) -> dict:
    """Mean |read - true| per axis (cm) of the gripper, the cube and the gripper-to-cube vector."""
    rel_read, rel_true = read[:, :3] - read[:, 3:], true[:, :3] - true[:, 3:]
    cm = lambda d: [round(float(v), 3) for v in np.abs(d).mean(0) * 100]  # noqa: E731
    return {"n": len(read), "gripper_cm": cm(read[:, :3] - true[:, :3]), "cube_cm": cm(read[:, 3:] - true[:, 3:]),
            "gripper_to_cube_cm": cm(rel_read - rel_true),
            "gripper_to_cube_xy_cm_p90": round(float(np.quantile(
                np.linalg.norm((rel_read - rel_true)[:, :2], axis=1), 0.9) * 100), 3) if len(read) else None}


def near(states: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(states[:, :3] - states[:, 3:], axis=1) < radius


def run_policy(probe: Probe, spec: str, seeds: list[int], env_kwargs: dict, num_envs: int, max_steps: int,
               radius: float, policy_seed: int) -> dict:
    gt_keys = ("agentview_image", *DEFAULT_PROPRIO_KEYS, OBJECT_KEY)
    gt, _, starts = run_gt(spec, seeds, max_steps, policy_seed, gt_keys)
    env = gym.make_vec("HMA-RobomimicLift-v0", num_envs=min(num_envs, len(seeds)),
                       vectorization_mode="vector_entry_point", obs_keys=gt_keys, **env_kwargs)
    policy = load_policy(spec, env, seed=policy_seed)
    frames: dict[int, list] = {}
    states: dict[int, list] = {}

    def record(i, obs, action, reward, next_obs, info):
        s = np.concatenate([next_obs[EEF_KEY], next_obs[OBJECT_KEY][:3]])[None]
        if near(s, radius)[0]:
            frames.setdefault(i, []).append(next_obs["agentview_image"])
            states.setdefault(i, []).append(s[0])

    options = [{"initial_observation": s} for s in starts]
    t0 = time.perf_counter()
    result = hma_gym.rollout(env, policy, len(seeds), seeds=seeds, reset_options=options, max_steps=max_steps,
                             on_step=record, desc=f"{spec} @ learned")
    wall = time.perf_counter() - t0
    checkpoint = str(env.unwrapped.sim.checkpoint)
    env.close()
    learned = [e.success for e in result.episodes]
    per_episode, reads, trues = [], [], []
    for i in range(len(seeds)):
        if i in frames:
            r, s = probe.read(np.stack(frames[i])), np.stack(states[i])
            reads.append(r)
            trues.append(s)
            gap = np.linalg.norm(((r[:, :3] - r[:, 3:]) - (s[:, :3] - s[:, 3:]))[:, :2], axis=1).mean() * 100
        else:
            gap = None
        per_episode.append({"gt": bool(gt[i]), "learned": bool(learned[i]), "near_steps": len(frames.get(i, [])),
                            "gripper_to_cube_xy_gap_cm": None if gap is None else round(float(gap), 3)})
    summary = errors(np.concatenate(reads), np.concatenate(trues)) if reads else {"n": 0}
    gaps = [(e["gripper_to_cube_xy_gap_cm"], e["gt"] == e["learned"]) for e in per_episode
            if e["gripper_to_cube_xy_gap_cm"] is not None]
    split = None
    if len(gaps) >= 4:  # agreement of the more and the less consistent halves of the episodes
        median = float(np.median([g for g, _ in gaps]))
        split = {"median_gap_cm": round(median, 3),
                 "agreement_below_median": float(np.mean([a for g, a in gaps if g <= median])),
                 "agreement_above_median": float(np.mean([a for g, a in gaps if g > median]))}
    return {"policy": spec, "gt_success": float(np.mean(gt)), "learned_success": float(np.mean(learned)),
            "agreement": float(np.mean(np.equal(gt, learned))), "frame_vs_state": summary,
            "agreement_by_consistency": split, "per_episode": per_episode, "wall_s": wall, "checkpoint": checkpoint}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, help="collected HDF5 files (with `object`) for the probe")
    parser.add_argument("--probe-demos", type=int, default=200, help="episodes read per file")
    parser.add_argument("--probe-valid", type=int, default=20, help="of those, held out per file (the floor)")
    parser.add_argument("--probe-frames", type=int, default=50, help="frames drawn per episode")
    parser.add_argument("--probe-steps", type=int, default=6000)
    parser.add_argument("--policies", nargs="*", default=["dp_lift", "expert"],
                        help=f"bank names or NAME=SPEC (bank: {', '.join(BANK)})")
    parser.add_argument("--checkpoint", default="", help="learned env checkpoint directory")
    parser.add_argument("--variant", default="", help="a shipped variant (maskgit, fast, fsq15k, mar)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=900_000, help="the verdict bank's seeds")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--num-envs", type=int, default=50)
    parser.add_argument("--near", type=float, default=0.05, help="gripper-to-cube distance (m) of compared steps")
    parser.add_argument("--policy-seed", type=int, default=0)
    parser.add_argument("--result", default="frame_state_consistency")
    args = parser.parse_args(argv)
    hma_gym.register_envs()
    env_kwargs = learned_env_kwargs(args.checkpoint or args.variant) if (args.checkpoint or args.variant) else {}
    if OBJECT_KEY not in predicted_keys(env_kwargs.get("checkpoint"), env_kwargs.get("variant", "maskgit")):
        raise SystemExit("this checkpoint does not predict the object state: nothing to compare its frames with")

    t0 = time.perf_counter()
    frames, targets, held = read_frames(args.data, args.probe_frames, args.probe_demos, args.probe_valid)
    probe = fit_probe(frames[~held], targets[~held], args.probe_steps)
    floor_rows = held & near(targets, args.near)
    floor = {"held_out_near": errors(probe.read(frames[floor_rows]), targets[floor_rows]),
             "held_out_all": errors(probe.read(frames[held]), targets[held]),
             "train_frames": int((~held).sum()), "train_s": time.perf_counter() - t0}
    print("probe floor on held-out GT frames:", floor["held_out_near"], flush=True)

    seeds = list(range(args.seed, args.seed + args.episodes))
    rows = {}
    for name, spec in parse_policies(args.policies).items():
        rows[name] = run_policy(probe, spec, seeds, env_kwargs, args.num_envs, args.max_steps, args.near,
                                args.policy_seed)
        print(name, {k: v for k, v in rows[name].items() if k != "per_episode"}, flush=True)
    checkpoint = next(iter(rows.values()))["checkpoint"] if rows else None
    payload = {"probe": {"data": args.data, "demos_per_file": args.probe_demos, "valid_per_file": args.probe_valid,
                         "frames_per_demo": args.probe_frames, "steps": args.probe_steps, **floor},
               "near_m": args.near, "episodes": args.episodes, "seeds": [seeds[0], seeds[-1]],
               "checkpoint": checkpoint, "checkpoint_weights_hash": weights_hash(checkpoint) if checkpoint else None,
               "env_kwargs": env_kwargs, "policies": rows}
    write_result(args.result, payload, module="frame_state_consistency")
    return payload


if __name__ == "__main__":
    main()
