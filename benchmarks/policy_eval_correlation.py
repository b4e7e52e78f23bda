"""Do the learned simulator's verdicts track the ground truth's? Several policies of different quality,
each evaluated on the same initial states in the GT env and (paired reset) in the learned env, whose
success comes from its own success detector.

    python -m benchmarks.policy_eval_correlation --policies runs/dp_lift/iter_100 runs/dp_lift/iter_300 ... \
        [--episodes 50] [--seed 20000] [--checkpoint DIR --tag NAME] [--num-envs 16] [--reuse]

Writes benchmarks/results/policy_eval_correlation[_TAG].json (pearson, spearman, mmrv, per-policy success
in both sims, wall times) and a scatter PNG of the same name. Per-policy reports go to outputs/correlation/
(`NAME_gt.json`, shared by every checkpoint, and `NAME_learned[_TAG].json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, write_result
from hma_gym.checkpoint import weights_hash
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


def episode_confusion(gt: list[dict], learned: list[dict]) -> dict:
    """Per-episode verdicts of the two sims on the same starts: where the learned sim disagrees, and how."""
    pairs = [(a["success"], b["success"]) for a, b in zip(gt, learned, strict=True)]
    return {"per_episode_agreement": sum(a == b for a, b in pairs) / len(pairs),
            "gt_fail_learned_success": sum(not a and b for a, b in pairs),
            "gt_success_learned_fail": sum(a and not b for a, b in pairs)}


def reuse_or_evaluate(cfg: EvaluateConfig, reuse: bool) -> dict:
    """An earlier report of the same evaluation (policy, env, episodes, seed, checkpoint) or a new one."""
    path = Path(cfg.out)
    if reuse and path.exists():
        old = json.loads(path.read_text())
        same = all(old["config"].get(k) == getattr(cfg, k) for k in ("policy", "env", "episodes", "seed", "checkpoint"))
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
    parser.add_argument("--tag", default="", help="suffix of result files and learned-env reports (another checkpoint)")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse per-policy reports in outputs/correlation/ made with the same episodes and seed")
    args = parser.parse_args(argv)
    names = args.names or [p.rstrip("/").split("/")[-1] for p in args.policies]
    rows, wall = [], {"gt_s": 0.0, "learned_s": 0.0}
    suffix = f"_{args.tag}" if args.tag else ""
    for spec, name in zip(args.policies, names, strict=True):
        out = Path("outputs/correlation") / name  # per-policy reports (not committed)
        gt_cfg = EvaluateConfig(policy=spec, env="RobomimicLift-v0", episodes=args.episodes, seed=args.seed,
                                out=str(out) + "_gt.json")
        learned_cfg = EvaluateConfig(policy=spec, env="HMA-RobomimicLift-v0", episodes=args.episodes, seed=args.seed,
                                     checkpoint=args.checkpoint, num_envs=args.num_envs,
                                     out=str(out) + f"_learned{suffix}.json")
        gt, learned = (reuse_or_evaluate(c, args.reuse) for c in (gt_cfg, learned_cfg))
        wall["gt_s"] += gt["wall_time_s"]
        wall["learned_s"] += learned["wall_time_s"]
        rows.append({"name": name, "policy": spec, "gt_success": gt["success_rate"],
                     "learned_success": learned["success_rate"], "gt_ci95": gt["success_ci95"],
                     "learned_ci95": learned["success_ci95"], "gt_mean_length": gt["mean_length"],
                     "learned_mean_length": learned["mean_length"],
                     **episode_confusion(gt["per_episode"], learned["per_episode"])})
        print(rows[-1])
    gt_rates = [r["gt_success"] for r in rows]
    learned_rates = [r["learned_success"] for r in rows]
    stats = {"pearson": pearson(gt_rates, learned_rates), "spearman": spearman(gt_rates, learned_rates),
             "mmrv": mmrv(gt_rates, learned_rates)}
    payload = {**stats, "episodes_per_policy": args.episodes, "seeds": [args.seed, args.seed + args.episodes - 1],
               "checkpoint": learned["checkpoint"], "checkpoint_weights_hash": weights_hash(learned["checkpoint"]),
               "policies": rows, "wall_time": wall}
    scatter(rows, RESULTS / f"policy_eval_correlation{suffix}.png", stats)
    write_result(f"policy_eval_correlation{suffix}", payload, module="policy_eval_correlation")
    return payload


if __name__ == "__main__":
    main()
