"""Synthetic-data study (the paper's Table 6): does learned-sim data stand in for real demos?

A Diffusion Policy is trained on a small real budget n (the first n successful training demos of
`--real`) plus 0, n, 5n, 9n synthetic episodes, and on 10n real demos; each policy is evaluated in the
GT env (MuJoCo) on the same `--episodes` starts. The synthetic episodes come from `hma-gym synthesize`:
the learned env replays the actions of `--source` episodes from their initial observations. `--source`
must hold episodes the world model never trained on (e.g. `hma-gym collect --seed 50000` into a new
file), otherwise the model only recalls what it memorised. Synthetic episodes are filtered by the
learned env's own success label (its detector), as real demos are by the GT label: no GT information
enters the synthetic data beyond the replayed actions and the first frame.

Steps run as the project's CLI commands (printed as they start), `--jobs` at a time, one thread each;
finished steps are reused on a re-run (the synthetic file, each policy's `metrics.json`, each GT report).

    python -m benchmarks.synthetic_data --real data/lift.hdf5 --source data/lift_src.hdf5 --n 10 \\
        --steps 2000 --batch-size 32 --jobs 2

Writes `benchmarks/results/synthetic_data.json` (`rows: [{real, synthetic, gt_success, ...}]`) and a
bar plot `synthetic_data.png`.

First, the DP budget at which data matters at all (issue 26: 10n real must beat n real by >= 0.25, with n
real <= 0.70, or the study cannot show what synthetic data buys):

    python -m benchmarks.synthetic_data --real data/lift.hdf5 --n 10 --calibrate 2000 4000 6000 8000 \
        --batch-size 64 --jobs 2

trains n and 10n real demos once each to the largest budget (the others saved on the way; a killed run
resumes), evaluates every budget in the GT env and writes `synthetic_data_calibration.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py

from benchmarks.common import RESULTS, hma, run, write_result
from hma_gym.data.hdf5 import read_env_args

GT_ID = "RobomimicLift-v0"


def mask_size(path: str | Path, key: str) -> int:
    with h5py.File(path, "r") as f:
        return len(f[f"mask/{key}"]) if f"mask/{key}" in f else 0


def synthetic_fidelity(synth: Path, source: str) -> dict:
    """How close the synthetic episodes are to what MuJoCo did with the same actions from the same start
    (the source episodes): frame PSNR by step range, and the learned env's success label against the GT one."""
    import numpy as np

    from hma_gym.metrics import psnr

    ranges = {"1-10": slice(1, 11), "11-30": slice(11, 31), "31-60": slice(31, 61), "61+": slice(61, None)}
    by_range: dict[str, list[float]] = {k: [] for k in ranges}
    labels = []
    with h5py.File(synth, "r") as fs, h5py.File(source, "r") as fg:
        for demo in fs["data"].values():
            src = fg["data"][str(demo.attrs["source_demo"])]
            a, b = demo["obs/agentview_image"][()], src["obs/agentview_image"][()]
            n = min(len(a), len(b))
            p = np.asarray(psnr(a[:n], b[:n])).reshape(-1)
            for k, sl in ranges.items():
                if len(p[sl]):
                    by_range[k].append(float(p[sl].mean()))
            labels.append((bool(src.attrs.get("success", False)), bool(demo.attrs.get("success", False))))
    gt, learned = np.array(labels).T
    return {
        "episodes": len(labels),
        "frame_psnr_vs_gt_by_step": {k: float(np.mean(v)) for k, v in by_range.items() if v},
        "label_agreement": float(np.mean(gt == learned)),
        "gt_success": int(gt.sum()), "learned_success": int(learned.sum()),
        "learned_success_but_gt_failure": int((~gt & learned).sum()),
        "gt_success_but_learned_failure": int((gt & ~learned).sum()),
    }


def rows_of(n: int, multiples: list[int], real_multiple: int) -> list[dict]:
    rows = [{"name": f"real{n}_synth{m * n}", "real": n, "synthetic": m * n} for m in multiples]
    rows.append({"name": f"real{real_multiple * n}", "real": real_multiple * n, "synthetic": 0})
    return rows


def gt_eval(policy: Path, report: Path, args) -> dict:
    """A policy's GT success on the study's starts (`--episodes` from `--seed`), cached in `report`."""
    if not report.is_file():
        run(hma("evaluate", "--policy", str(policy), "--env", GT_ID, "--episodes", str(args.episodes),
                "--seed", str(args.seed), "--out", str(report)), report.with_suffix(".log"))
    return json.loads(report.read_text())


def calibrate(args, work: Path) -> dict:
    """The DP budget at which data matters: n real and 10n real demos, each trained once to the largest of
    `--calibrate` budgets (the others saved on the way; a killed run resumes), every budget evaluated in the
    GT env. The study's budget: the smallest where 10n real beats n real by >= 0.25 with n real <= 0.70."""
    budgets = sorted(set(args.calibrate))
    top = budgets[-1]
    rows = [{"name": f"real{m}", "real": m} for m in (args.n, args.real_multiple * args.n)]

    def train(row: dict) -> dict:
        out = work / "calibration" / row["name"]
        done = (out / "policy.json").is_file() and json.loads((out / "policy.json").read_text())["info"]["step"] == top
        if not done:
            run(hma("train-policy", "--data", args.real, "--filter-key", args.real_key, "--valid-key", "",
                    "--max-demos", str(row["real"]), "--steps", str(top), "--batch-size", str(args.batch_size),
                    "--save-at", *map(str, budgets[:-1]), "--out", str(out), "--threads", "1", "--no-progress"),
                out / "train.log")
        rates = {}
        for b in budgets:
            policy = out if b == top else out / f"iter_{b}"
            gt = gt_eval(policy, out / f"gt_eval_{b}.json", args)
            rates[b] = {"gt_success": gt["success_rate"], "gt_ci95": gt["success_ci95"]}
        return {**row, "by_budget": rates}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(train, rows))
    small, large = (r["by_budget"] for r in results)
    curve = [{"steps": b, "n_real": small[b]["gt_success"], "ten_n_real": large[b]["gt_success"],
              "gap": large[b]["gt_success"] - small[b]["gt_success"]} for b in budgets]
    chosen = next((c["steps"] for c in curve if c["gap"] >= 0.25 and c["n_real"] <= 0.70), None)
    payload = {"n": args.n, "real_multiple": args.real_multiple, "batch_size": args.batch_size,
               "episodes": args.episodes, "seeds": [args.seed, args.seed + args.episodes - 1], "real_data": args.real,
               "rows": results, "curve": curve, "chosen_steps": chosen,
               "criterion": "10n real - n real >= 0.25 and n real <= 0.70"}
    write_result(f"{args.result}_calibration", payload, module="synthetic_data")
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", default="data/lift.hdf5", help="real robomimic file (its train_success demos)")
    p.add_argument("--real-key", default="train_success", help="mask of the real demos to draw from")
    p.add_argument("--source", default="",
                   help="robomimic file whose actions the learned env replays (never seen by the world model)")
    p.add_argument("--checkpoint", default="", help="learned env checkpoint (default: the shipped one)")
    p.add_argument("--n", type=int, default=10, help="small real budget")
    p.add_argument("--multiples", type=int, nargs="+", default=[0, 1, 5, 9],
                   help="synthetic episodes per row, in units of n")
    p.add_argument("--real-multiple", type=int, default=10, help="the all-real row's demos, in units of n")
    p.add_argument("--synthetic-key", default="train_success",
                   help="mask of the synthetic file to draw from (train_success: the learned env's success label; "
                        "empty: every episode)")
    p.add_argument("--steps", type=int, default=2000, help="DP training steps of every row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--episodes", type=int, default=50, help="GT evaluation episodes per policy")
    p.add_argument("--seed", type=int, default=20000, help="first GT evaluation seed (disjoint from collection)")
    p.add_argument("--jobs", type=int, default=2, help="commands run side by side (one thread each)")
    p.add_argument("--work", default="runs/synthetic_data", help="directory of the synthetic file, runs, reports")
    p.add_argument("--result", default="synthetic_data", help="name of the JSON/PNG under benchmarks/results")
    p.add_argument("--calibrate", type=int, nargs="+", default=None, metavar="STEPS",
                   help="only calibrate the DP budget: n and 10n real demos trained to these step counts, each "
                        "evaluated in the GT env (-> RESULT_calibration.json); no synthetic data")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.episodes < 1 or args.jobs < 1:
        p.error("--n, --steps, --episodes and --jobs must be positive")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        have, need = mask_size(args.real, args.real_key), args.real_multiple * args.n
        if have < need:
            p.error(f"{args.real}: mask/{args.real_key} has {have} demos, the calibration needs {need}")
        return calibrate(args, work)
    if not args.source:
        p.error("--source is required (except with --calibrate)")
    rows = rows_of(args.n, args.multiples, args.real_multiple)
    need_real = max(r["real"] for r in rows)
    have_real = mask_size(args.real, args.real_key)
    if have_real < need_real:
        p.error(f"{args.real}: mask/{args.real_key} has {have_real} demos, the study needs {need_real}")
    need_synth = max(r["synthetic"] for r in rows)
    t0 = time.perf_counter()

    # 1. the synthetic file (resumable: synthesize skips source demos it already replayed); it runs side by
    # side with the all-real rows, which do not need it
    synth = work / "synthetic.hdf5"
    timing = {}

    timing_file = work / "synthesize_time.json"  # the time of the run that made the file, kept for re-runs

    def make_synthetic() -> None:
        t = time.perf_counter()
        before = mask_size(synth, "train") if synth.is_file() else 0
        cmd = hma("synthesize", "--actions", args.source, "--split", "all", "--out", str(synth),
                  "--valid-every", "0", "--no-progress")
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        run(cmd, work / "synthesize.log")
        have = mask_size(synth, args.synthetic_key or "train")
        if have < need_synth:
            raise RuntimeError(f"{synth}: {have} synthetic episodes under mask/{args.synthetic_key or 'train'}, "
                               f"the study needs {need_synth}: collect more source episodes into {args.source}")
        spent = time.perf_counter() - t
        if mask_size(synth, "train") > before or not timing_file.is_file():  # episodes were generated now
            previous = json.loads(timing_file.read_text())["synthesize_s"] if timing_file.is_file() and before else 0.0
            timing_file.write_text(json.dumps({"synthesize_s": previous + spent}))
        timing["synthesize_s"] = json.loads(timing_file.read_text())["synthesize_s"]

    # 2. one DP per row, then its GT evaluation
    def do_row(row: dict) -> dict:
        out = work / row["name"]
        if row["synthetic"]:
            synth_done.result()
        if not (out / "metrics.json").is_file() or json.loads((out / "policy.json").read_text())["info"]["step"] \
                != args.steps:
            cmd = hma("train-policy", "--data", args.real, "--filter-key", args.real_key, "--valid-key", "",
                      "--max-demos", str(row["real"]), "--steps", str(args.steps), "--batch-size",
                      str(args.batch_size), "--out", str(out), "--threads", "1", "--no-progress")
            if row["synthetic"]:
                cmd += ["--extra-data", str(synth), "--extra-filter-key", args.synthetic_key,
                        "--extra-max-demos", str(row["synthetic"])]
            run(cmd, out / "train.log")
        report = out / "gt_eval.json"
        if not report.is_file():
            run(hma("evaluate", "--policy", str(out), "--env", GT_ID, "--episodes", str(args.episodes),
                    "--seed", str(args.seed), "--out", str(report)), out / "eval.log")
        info = json.loads((out / "policy.json").read_text())["info"]
        gt = json.loads(report.read_text())
        return {**row, "train_demos": info["train_demos"], "synthetic_demos": sum(info.get("extra_demos", [0])),
                "train_windows": info["train_windows"], "gt_success": gt["success_rate"],
                "gt_ci95": gt["success_ci95"], "gt_mean_length": gt["mean_length"], "policy": str(out),
                "train_wall_s": json.loads((out / "metrics.json").read_text())["wall_s"],
                "gt_eval_wall_s": gt["wall_time_s"]}

    with ThreadPoolExecutor(args.jobs) as pool:
        synth_done = pool.submit(make_synthetic) if need_synth else None
        order = sorted(range(len(rows)), key=lambda i: rows[i]["synthetic"] > 0)  # all-real rows first
        futures = {i: pool.submit(do_row, rows[i]) for i in order}
        results = [futures[i].result() for i in range(len(rows))]
    for r in results:
        if r["synthetic_demos"] != r["synthetic"] or r["train_demos"] != r["real"] + r["synthetic"]:
            raise RuntimeError(f"{r['name']}: trained on {r['train_demos']} demos ({r['synthetic_demos']} synthetic), "
                               f"expected {r['real']} real + {r['synthetic']} synthetic")

    env_args = read_env_args(synth) if need_synth else {}
    by = {(r["real"], r["synthetic"]): r["gt_success"] for r in results}
    n, full = args.n, args.real_multiple * args.n
    best_mix = by.get((n, max(args.multiples) * n))
    payload = {
        "n": n,
        "rows": results,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "episodes": args.episodes,
        "seeds": [args.seed, args.seed + args.episodes - 1],
        "real_data": args.real,
        "source": args.source,
        "synthetic_file": str(synth) if need_synth else None,
        "checkpoint": env_args.get("checkpoint"),
        "checkpoint_hash": env_args.get("checkpoint_hash"),
        "synthetic_vs_source": synthetic_fidelity(synth, args.source) if need_synth else None,
        "targets": {
            "mix_within_10_points_of_all_real": None if best_mix is None else best_mix >= by[(full, 0)] - 0.10,
            "mix_beats_small_real": None if best_mix is None or (n, 0) not in by else best_mix > by[(n, 0)],
        },
        "wall_time": {**timing, "this_run_s": time.perf_counter() - t0,
                      "train_s": sum(r["train_wall_s"] for r in results),
                      "gt_eval_s": sum(r["gt_eval_wall_s"] for r in results)},
    }
    write_result(args.result, payload, module="synthetic_data")
    plot(results, RESULTS / f"{args.result}.png", args)
    return payload


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = [f"{r['real']} real\n+{r['synthetic']} synth" if r["synthetic"] else f"{r['real']} real" for r in rows]
    vals = [r["gt_success"] for r in rows]
    err = [[r["gt_success"] - r["gt_ci95"][0] for r in rows], [r["gt_ci95"][1] - r["gt_success"] for r in rows]]
    colors = ["tab:green" if r["synthetic"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), vals, yerr=err, color=colors, capsize=4)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"GT success ({args.episodes} episodes, 95% CI)")
    ax.set_title(f"DP trained on real + learned-sim data ({args.steps} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
