"""Do the learned simulator's verdicts track the ground truth's? Several policies of different quality,
each evaluated on the same initial states in the GT env and (paired reset) in the learned env, whose
success comes from its own success detector.

    python -m benchmarks.policy_eval_correlation --policies runs/dp_lift/iter_100 runs/dp_lift/iter_300 ... \
        [--episodes 50] [--seed 20000] [--checkpoint DIR --tag NAME] [--num-envs 16] [--reuse] [--result NAME]

Writes benchmarks/results/RESULT.json (default policy_eval_correlation: pearson, spearman, mmrv with
95% bootstrap intervals over episodes, per-policy success in both sims, wall times) and RESULT.png
(scatter). Per-policy reports go to outputs/correlation/ (`NAME_gt.json`, shared by every checkpoint,
and `NAME_learned[_TAG].json`); `--reuse` takes a learned report only if it was made with the same
checkpoint weights (hash).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result
from hma_gym.checkpoint import weights_hash
from hma_gym.envs.learned_env import default_checkpoint
from hma_gym.metrics import mmrv, pearson, spearman
from policies.evaluate import EvaluateConfig, evaluate


def scatter(rows: list[dict], path, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    gt = [r["gt_success"] for r in rows]
    learned = [r["learned_success"] for r in rows]
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    ax.scatter(gt, learned, s=40)
    for r in rows:
        ax.annotate(r["name"], (r["gt_success"], r["learned_success"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("success rate, MuJoCo (GT)")
    ax.set_ylabel("success rate, HMA learned sim")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"pearson {stats['pearson']:.2f}  spearman {stats['spearman']:.2f}  mmrv {stats['mmrv']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rate_stats(gt_rates: list[float], learned_rates: list[float]) -> dict:
    """Pearson, Spearman and MMRV between per-policy success rates of the two sims."""
    return {"pearson": pearson(gt_rates, learned_rates), "spearman": spearman(gt_rates, learned_rates),
            "mmrv": mmrv(gt_rates, learned_rates)}


def episode_confusion(gt: list[dict], learned: list[dict]) -> dict:
    """Per-episode verdicts of the two sims on the same starts: where the learned sim disagrees, and how."""
    pairs = [(a["success"], b["success"]) for a, b in zip(gt, learned, strict=True)]
    return {"per_episode_agreement": sum(a == b for a, b in pairs) / len(pairs),
            "gt_fail_learned_success": sum(not a and b for a, b in pairs),
            "gt_success_learned_fail": sum(a and not b for a, b in pairs)}


def bootstrap(gt: list[list[bool]], learned: list[list[bool]], n: int, seed: int = 0) -> dict:
    """95% intervals of pearson, spearman and mmrv when each policy's episodes are resampled with
    replacement (the same resampled starts in both sims, since episodes are paired)."""
    rng = np.random.default_rng(seed)
    g, lr = np.asarray(gt, float), np.asarray(learned, float)  # (policies, episodes)
    stats: dict[str, list[float]] = {"pearson": [], "spearman": [], "mmrv": []}
    for _ in range(n):
        idx = rng.integers(0, g.shape[1], g.shape)
        a, b = np.take_along_axis(g, idx, 1).mean(1), np.take_along_axis(lr, idx, 1).mean(1)
        if a.std() == 0 or b.std() == 0:
            continue
        stats["pearson"].append(pearson(a, b))
        stats["spearman"].append(spearman(a, b))
        stats["mmrv"].append(mmrv(a, b))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in stats.items() if v} | {
        "resamples": len(stats["pearson"])}


def reuse_or_evaluate(cfg: EvaluateConfig, reuse: bool) -> dict:
    """An earlier report of the same evaluation (policy, env, episodes, seed, checkpoint) or a new one."""
    path = Path(cfg.out)
    if reuse and path.exists():
        old = json.loads(path.read_text())
        same = all(old["config"].get(k) == getattr(cfg, k) for k in ("policy", "env", "episodes", "seed", "checkpoint"))
        if old.get("learned"):
            current = weights_hash(cfg.checkpoint or default_checkpoint())
            same = same and old.get("checkpoint_weights_hash") == current
        if same:
            return old
    return evaluate(cfg)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", required=True, help="policy specs (DP checkpoint dirs, ...)")
    parser.add_argument("--names", nargs="*", default=None, help="short names for the plot")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20_000, help="episode seeds seed..seed+n (held out)")
    parser.add_argument("--checkpoint", default="", help="learned env checkpoint (default: the shipped one)")
    parser.add_argument("--tag", default="", help="suffix of the per-policy learned-env reports (another checkpoint)")
    parser.add_argument("--result", default="policy_eval_correlation", help="name of the result JSON/PNG")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the episodes")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse per-policy reports in outputs/correlation/ made with the same episodes and seed")
    args = parser.parse_args(argv)
    names = args.names or [p.rstrip("/").split("/")[-1] for p in args.policies]
    rows, wall = [], {"gt_s": 0.0, "learned_s": 0.0}
    verdicts: dict[str, list[list[bool]]] = {"gt": [], "learned": []}
    suffix = f"_{args.tag}" if args.tag else ""
    for spec, name in zip(args.policies, names, strict=True):
        out = Path("outputs/correlation") / name  # per-policy reports (not committed)
        gt_cfg = EvaluateConfig(policy=spec, env="RobomimicLift-v0", episodes=args.episodes, seed=args.seed,
                                out=str(out) + "_gt.json")
        learned_cfg = EvaluateConfig(policy=spec, env="HMA-RobomimicLift-v0", episodes=args.episodes, seed=args.seed,
                                     checkpoint=args.checkpoint, num_envs=args.num_envs,
                                     out=str(out) + f"_learned{suffix}.json")
        gt, learned = (reuse_or_evaluate(c, args.reuse) for c in (gt_cfg, learned_cfg))
        verdicts["gt"].append([e["success"] for e in gt["per_episode"]])
        verdicts["learned"].append([e["success"] for e in learned["per_episode"]])
        wall["gt_s"] += gt["wall_time_s"]
        wall["learned_s"] += learned["wall_time_s"]
        rows.append({"name": name, "policy": spec, "gt_success": gt["success_rate"],
                     "learned_success": learned["success_rate"], "gt_ci95": gt["success_ci95"],
                     "learned_ci95": learned["success_ci95"], "gt_mean_length": gt["mean_length"],
                     "learned_mean_length": learned["mean_length"],
                     **episode_confusion(gt["per_episode"], learned["per_episode"])})
        print(rows[-1])
    stats = rate_stats([r["gt_success"] for r in rows], [r["learned_success"] for r in rows])
    payload = {**stats, "episodes_per_policy": args.episodes, "seeds": [args.seed, args.seed + args.episodes - 1],
               "bootstrap_ci95": bootstrap(verdicts["gt"], verdicts["learned"], args.bootstrap),
               "checkpoint": learned["checkpoint"], "checkpoint_weights_hash": weights_hash(learned["checkpoint"]),
               "policies": rows, "wall_time": wall}
    scatter(rows, RESULTS / f"{args.result}.png", stats)
    write_result(args.result, payload, module="policy_eval_correlation")
    return payload


if __name__ == "__main__":
    main()
