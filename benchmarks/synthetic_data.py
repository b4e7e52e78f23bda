"""Synthetic-data study (the paper's Table 6): does learned-sim data stand in for real demos?

A Diffusion Policy is trained on a small real budget n (the first n successful training demos of
`--real`), on n real + m*n synthetic episodes of each kind (`--multiples`, default 9), and on 10n real
demos; each policy runs in the GT env (MuJoCo) on the same `--episodes` starts (success with a 95% CI).
Synthetic episodes come from `hma-gym synthesize` with the learned env's own verdict (`mask/train_success`:
judged successful, not unjudged), so no GT information enters them beyond a first frame:
- replayed: the actions of `--source` episodes from their first frames (what the paper does). `--source`
  must hold episodes the world model never trained on (e.g. `hma-gym collect --seed 50000` into a new
  file), otherwise the model only recalls what it memorised; their MuJoCo outcomes give the labels'
  accuracy and the frames' PSNR by step range;
- new: `--new-policy` (default the scripted expert) run in the learned env from starts of its bank, so the
  set holds trajectories no real file has;
- controls (not synthetic data), from the new kind's training starts in MuJoCo (each bank start is a first
  frame of `--bank-source`, reset by its demo's seed): new_in_mujoco replays the new kind's actions, so the
  row differs from the new row only in who drew the frames (and the replays' MuJoCo outcomes are the new
  kind's label accuracy); new_starts_in_mujoco runs `--new-policy` on MuJoCo's own state, so it differs from
  new_in_mujoco only in the state the actions were chosen from.

Every step is a project CLI command (printed as it starts), `--jobs` at a time, one thread each, and each
row is an independent job: finished steps are reused on a re-run (each synthetic file resumes, each
policy's `metrics.json`, each GT report), so the study can span sessions.

    python -m benchmarks.synthetic_data --real data/lift.hdf5 --source data/lift_src70k.hdf5 --n 10 \\
        --steps 8000 --batch-size 64 --jobs 2

Writes `benchmarks/results/synthetic_data.json` (`rows: [{name, real, synthetic, kind, gt_success, gt_ci95,
...}]`, per kind the file's verdicts, label accuracy and PSNR) and a bar plot `synthetic_data.png`.

First, the DP budget at which data matters at all (issue 26: 10n real must beat n real by >= 0.25, with n
real <= 0.70, or the study cannot show what synthetic data buys):

    python -m benchmarks.synthetic_data --real data/lift.hdf5 --n 10 --calibrate 4000 8000 \\
        --batch-size 64 --jobs 2

trains n and 10n real demos for each budget (one run each: a snapshot of a longer run is not what a run
of that length ends with), evaluates each in the GT env and writes `synthetic_data_calibration.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py

from benchmarks.common import RESULTS, hma, run, write_result
from hma_gym.data.hdf5 import list_demos, read_env_args

GT_ID = "RobomimicLift-v0"
CONTROLS = {"new_in_mujoco": "the new kind's actions", "new_starts_in_mujoco": "the new policy on MuJoCo's state"}
"""Control kinds (not synthetic data; no targets): from the new kind's training starts in MuJoCo, its own
actions replayed, or the new kind's policy acting on MuJoCo's state."""


def mask_size(path: str | Path, key: str) -> int:
    with h5py.File(path, "r") as f:
        return len(f[f"mask/{key}"]) if f"mask/{key}" in f else 0


def psnr_by_step(pairs) -> dict[str, float]:
    """Mean PSNR of generated frames against MuJoCo's for the same actions, by step range (each episode's
    mean over a range, then the mean over episodes); `pairs`: (generated, MuJoCo) frame arrays per episode."""
    import numpy as np

    from hma_gym.metrics import psnr

    ranges = {"1-10": slice(1, 11), "11-30": slice(11, 31), "31-60": slice(31, 61), "61+": slice(61, None)}
    by_range: dict[str, list[float]] = {k: [] for k in ranges}
    for a, b in pairs:
        n = min(len(a), len(b))
        p = np.asarray(psnr(a[:n], b[:n])).reshape(-1)
        for k, sl in ranges.items():
            if len(p[sl]):
                by_range[k].append(float(p[sl].mean()))
    return {k: float(np.mean(v)) for k, v in by_range.items() if v}


def synthetic_fidelity(synth: Path, source: str) -> dict:
    """How close the synthetic episodes are to what MuJoCo did with the same actions from the same start
    (the source episodes): frame PSNR by step range, and the learned env's success label against the GT one."""
    import numpy as np

    labels, pairs = [], []
    with h5py.File(synth, "r") as fs, h5py.File(source, "r") as fg:
        for demo in fs["data"].values():
            src = fg["data"][str(demo.attrs["source_demo"])]
            pairs.append((demo["obs/agentview_image"][()], src["obs/agentview_image"][()]))
            labels.append((bool(src.attrs.get("success", False)), bool(demo.attrs.get("success", False))))
    gt, learned = np.array(labels).T
    return {
        "episodes": len(labels),
        "frame_psnr_vs_gt_by_step": psnr_by_step(pairs),
        "label_agreement": float(np.mean(gt == learned)),
        "gt_success": int(gt.sum()), "learned_success": int(learned.sum()),
        "learned_success_but_gt_failure": int((~gt & learned).sum()),
        "gt_success_but_learned_failure": int((gt & ~learned).sum()),
    }


def rows_of(n: int, multiples: list[int], real_multiple: int, kinds: list[str]) -> list[dict]:
    """n real; n real + m*n synthetic of each kind; real_multiple*n real."""
    rows = [{"name": f"real{n}", "real": n, "synthetic": 0, "kind": None}]
    rows += [{"name": f"real{n}_{kind}{m * n}", "real": n, "synthetic": m * n, "kind": kind}
             for kind in kinds for m in multiples if m > 0]
    rows.append({"name": f"real{real_multiple * n}", "real": real_multiple * n, "synthetic": 0, "kind": None})
    return rows


def synthetic_summary(path: Path) -> dict:
    """The learned env's verdicts on a synthetic file's episodes."""
    with h5py.File(path, "r") as f:
        attrs = [f[f"data/{name}"].attrs for name in list_demos(path)]
        success = [bool(a.get("success", False)) for a in attrs]
        unjudged = [bool(a.get("unjudged", False)) for a in attrs]
    return {"episodes": len(attrs), "learned_success": int(sum(success)), "unjudged": int(sum(unjudged)),
            "judged_success": int(sum(s and not u for s, u in zip(success, unjudged, strict=True)))}


def in_mujoco(synthetic: Path, bank_source: str, out: Path, key: str, count: int, policy: str = "") -> None:
    """The first `count` episodes of `synthetic` under `mask/key` (in index order, as training picks them),
    run in MuJoCo from their starts and written to `out` (every episode in `mask/train`): their actions
    replayed (MuJoCo's frames, proprio and outcomes for the same actions), or with `policy` that policy acting
    on MuJoCo's state (episodes end 10 steps after a success, as `collect` records). A start is found among
    the first frames of `bank_source` (the file the checkpoint's bank was drawn from) by the cube's pose and
    reset by that demo's seed. `out` is made once (written under a temporary name, then renamed)."""
    if out.is_file():
        return
    import gymnasium as gym
    import numpy as np

    import hma_gym
    from benchmarks.verdict_agreement import WaveReplay
    from hma_gym.data.hdf5 import RobomimicWriter
    from hma_gym.envs.robosuite_env import DEFAULT_PROPRIO_KEYS
    from hma_gym.tasks import OBJECT_KEY
    from policies.registry import load_policy

    names, bank = list_demos(synthetic, key)[:count], list_demos(bank_source)
    with h5py.File(synthetic, "r") as f:
        actions = [f[f"data/{n}/actions"][()] for n in names]
        cubes = np.stack([f[f"data/{n}/obs/{OBJECT_KEY}"][0, :3] for n in names])
    with h5py.File(bank_source, "r") as f:
        starts = np.stack([f[f"data/{n}/obs/{OBJECT_KEY}"][0, :3] for n in bank])
        seeds = np.array([int(f[f"data/{n}"].attrs["seed"]) for n in bank])
    gap = np.linalg.norm(cubes[:, None] - starts[None], axis=-1)
    if gap.min(1).max() > 1e-3:
        raise RuntimeError(f"{synthetic}: a start is not a first frame of {bank_source} (cube > 1 mm from every "
                           "one): pass the file the checkpoint's bank was drawn from as --bank-source")
    keys = ("agentview_image", *DEFAULT_PROPRIO_KEYS, OBJECT_KEY)  # as `collect` records
    env = gym.make(GT_ID, terminate_on_success=False, obs_keys=keys)
    tmp = out.with_suffix(".tmp.hdf5")
    tmp.unlink(missing_ok=True)
    writer = RobomimicWriter(tmp, {**read_env_args(bank_source), "replayed_from": str(synthetic)}, valid_every=0)
    episode_seeds = [int(s) for s in seeds[gap.argmin(1)]]
    if policy:
        hma_gym.rollout(env, load_policy(policy, env, seed=0), len(names), seeds=episode_seeds, writer=writer,
                        steps_after_success=10, max_steps=100, progress=False)
    else:
        hma_gym.rollout(env, WaveReplay(actions, 1), len(names), seeds=episode_seeds, writer=writer,
                        steps_after_success=10**9, max_steps=[len(a) for a in actions], progress=False)
    env.close()
    tmp.rename(out)


def mujoco_summary(synthetic: Path, out: Path, key: str, frames: bool) -> dict:
    """How many of `in_mujoco`'s episodes succeed in MuJoCo and, with `frames` (replayed actions), the PSNR of
    the synthetic episodes' frames against MuJoCo's."""
    names = list_demos(synthetic, key)[: len(list_demos(out))]
    with h5py.File(out, "r") as f, h5py.File(synthetic, "r") as fs:
        success = [bool(f[f"data/demo_{i}"].attrs["success"]) for i in range(len(names))]
        pairs = [(fs[f"data/{n}/obs/agentview_image"][()], f[f"data/demo_{i}/obs/agentview_image"][()])
                 for i, n in enumerate(names)] if frames else []
    return {"file": str(out), "episodes": len(success), "mujoco_success": int(sum(success)),
            **({"frame_psnr_vs_gt_by_step": psnr_by_step(pairs)} if frames else {})}


def gt_eval(policy: Path, report: Path, args) -> dict:
    """A policy's GT success on the study's starts (`--episodes` from `--seed`), cached in `report`."""
    if not report.is_file():
        run(hma("evaluate", "--policy", str(policy), "--env", GT_ID, "--episodes", str(args.episodes),
                "--seed", str(args.seed), "--out", str(report)), report.with_suffix(".log"))
    return json.loads(report.read_text())


def train_dp(args, out: Path, real: int, steps: int, extra: tuple[str, ...] = ()) -> None:
    """`train-policy` on the first `real` demos of `--real` (+ `extra` arguments), unless `out` already holds
    a finished run of `steps` steps (a killed one resumes from its last save)."""
    policy = out / "policy.json"
    if (out / "metrics.json").is_file() and json.loads(policy.read_text())["info"]["step"] == steps:
        return
    run(hma("train-policy", "--data", args.real, "--filter-key", args.real_key, "--valid-key", "",
            "--max-demos", str(real), "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--out", str(out), "--threads", "1", "--no-progress", *extra), out / "train.log")


def calibrate(args, work: Path) -> dict:
    """The DP budget at which data matters: n and 10n real demos, one run per `--calibrate` budget (each its
    own learning-rate schedule: a snapshot halfway through a longer run is not the policy a shorter run ends
    with), each evaluated in the GT env; finished runs and reports are reused. The study's budget: the
    smallest where 10n real beats n real by >= 0.25 with n real <= 0.70."""
    budgets = sorted(set(args.calibrate))
    rows = [{"name": f"real{m}", "real": m} for m in (args.n, args.real_multiple * args.n)]

    def train(job: tuple[dict, int]) -> tuple[str, int, dict]:
        row, steps = job
        out = work / "calibration" / f"{row['name']}_{steps}"
        train_dp(args, out, row["real"], steps)
        gt = gt_eval(out, out / "gt_eval.json", args)
        return row["name"], steps, {"gt_success": gt["success_rate"], "gt_ci95": gt["success_ci95"]}

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(train, [(r, b) for b in budgets for r in rows]))
    rates = {(name, b): v for name, b, v in done}
    results = [{**r, "by_budget": {b: rates[(r["name"], b)] for b in budgets}} for r in rows]
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
                   help="replayed kind: robomimic file whose actions the learned env replays (never seen by the "
                        "world model)")
    p.add_argument("--kinds", nargs="+", default=["replayed", "new"], choices=["replayed", "new", *CONTROLS],
                   help="synthetic data: replayed (--source's actions from its first frames) and/or new (--new-policy "
                        "run in the learned env from starts of the checkpoint's bank); controls from the new kind's "
                        "starts in MuJoCo: " + "; ".join(f"{k}: {v}" for k, v in CONTROLS.items()))
    p.add_argument("--bank-source", default="",
                   help="controls: the file the checkpoint's bank of starts was drawn from (default: --real)")
    p.add_argument("--new-policy", default="expert", help="the new kind's policy (evaluate's specs)")
    p.add_argument("--new-episodes", type=int, default=0,
                   help="new-kind episodes to generate (0: twice the largest synthetic row)")
    p.add_argument("--checkpoint", default="", help="learned env checkpoint (default: the shipped one)")
    p.add_argument("--n", type=int, default=10, help="small real budget")
    p.add_argument("--multiples", type=int, nargs="+", default=[9],
                   help="synthetic episodes per row of each kind, in units of n")
    p.add_argument("--real-multiple", type=int, default=10, help="the all-real row's demos, in units of n")
    p.add_argument("--synthetic-key", default="train_success",
                   help="mask of the synthetic files to draw from (train_success: judged successful by the learned "
                        "env; empty: every episode)")
    p.add_argument("--steps", type=int, default=2000, help="DP training steps of every row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--episodes", type=int, default=50, help="GT evaluation episodes per policy")
    p.add_argument("--seed", type=int, default=20000, help="first GT evaluation seed (disjoint from collection)")
    p.add_argument("--jobs", type=int, default=2, help="commands run side by side (one thread each)")
    p.add_argument("--work", default="runs/synthetic_data", help="directory of the synthetic files, runs, reports")
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
    rows = rows_of(args.n, args.multiples, args.real_multiple, args.kinds)
    if "replayed" in args.kinds and not args.source:
        p.error("the replayed kind needs --source (or --kinds new)")
    if set(CONTROLS) & set(args.kinds) and "new" not in args.kinds:
        p.error("the controls run from the new kind's starts: add --kinds new")
    args.kinds = sorted(args.kinds, key=lambda k: k in CONTROLS)  # controls after the new kind they wait for
    need_real = max(r["real"] for r in rows)
    have_real = mask_size(args.real, args.real_key)
    if have_real < need_real:
        p.error(f"{args.real}: mask/{args.real_key} has {have_real} demos, the study needs {need_real}")
    need_synth = {k: max([r["synthetic"] for r in rows if r["kind"] == k], default=0) for k in args.kinds}
    t0 = time.perf_counter()

    # 1. a synthetic file per kind (synthesize resumes; the time of the runs that made it is kept for re-runs);
    # made side by side with the all-real rows, which do not need them
    synth = {k: work / (f"{k}.hdf5" if k in CONTROLS else f"synthetic_{k}.hdf5") for k in args.kinds}
    timing: dict[str, float] = {}

    def make_synthetic(kind: str) -> None:
        if kind in CONTROLS:
            synth_done["new"].result()
            in_mujoco(synth["new"], args.bank_source or args.real, synth[kind], args.synthetic_key or "train",
                      need_synth[kind], policy=args.new_policy if kind == "new_starts_in_mujoco" else "")
            return
        path, timing_file = synth[kind], work / f"synthesize_{kind}_time.json"
        t = time.perf_counter()
        before = mask_size(path, "train") if path.is_file() else 0
        if kind == "replayed":
            cmd = hma("synthesize", "--actions", args.source, "--split", "all")
        else:
            episodes = args.new_episodes or 2 * need_synth[kind]
            cmd = hma("synthesize", "--policy", args.new_policy, "--episodes", str(episodes))
        cmd += ["--out", str(path), "--valid-every", "0", "--no-progress"]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        run(cmd, work / f"synthesize_{kind}.log")
        have = mask_size(path, args.synthetic_key or "train")
        if have < need_synth[kind]:
            more = f"collect more source episodes into {args.source}" if kind == "replayed" else "raise --new-episodes"
            raise RuntimeError(f"{path}: {have} synthetic episodes under mask/{args.synthetic_key or 'train'}, "
                               f"the study needs {need_synth[kind]}: {more}")
        spent = time.perf_counter() - t
        if mask_size(path, "train") > before or not timing_file.is_file():  # episodes were generated now
            previous = json.loads(timing_file.read_text())["synthesize_s"] if timing_file.is_file() and before else 0.0
            timing_file.write_text(json.dumps({"synthesize_s": previous + spent}))
        timing[f"synthesize_{kind}_s"] = json.loads(timing_file.read_text())["synthesize_s"]

    # 2. one DP per row, then its GT evaluation: each an independent job, reused once finished (a killed
    # training resumes from its last save)
    def do_row(row: dict) -> dict:
        out = work / row["name"]
        if row["kind"]:
            synth_done[row["kind"]].result()
        key = "train" if row["kind"] in CONTROLS else args.synthetic_key  # a control: every episode
        extra = ("--extra-data", str(synth[row["kind"]]), "--extra-filter-key", key,
                 "--extra-max-demos", str(row["synthetic"])) if row["kind"] else ()
        train_dp(args, out, row["real"], args.steps, extra)
        gt = gt_eval(out, out / "gt_eval.json", args)
        info = json.loads((out / "policy.json").read_text())["info"]
        return {**row, "train_demos": info["train_demos"], "synthetic_demos": sum(info.get("extra_demos", [0])),
                "train_windows": info["train_windows"], "gt_success": gt["success_rate"],
                "gt_ci95": gt["success_ci95"], "gt_mean_length": gt["mean_length"], "policy": str(out),
                "train_wall_s": json.loads((out / "metrics.json").read_text())["wall_s"],
                "gt_eval_wall_s": gt["wall_time_s"]}

    with ThreadPoolExecutor(args.jobs) as pool:
        synth_done = {}
        for k in args.kinds:  # in order: a task is submitted only after the futures it waits for exist
            if need_synth[k]:
                synth_done[k] = pool.submit(make_synthetic, k)
        order = sorted(range(len(rows)), key=lambda i: rows[i]["synthetic"] > 0)  # all-real rows first
        futures = {i: pool.submit(do_row, rows[i]) for i in order}
        results = [futures[i].result() for i in range(len(rows))]
    for r in results:
        if r["synthetic_demos"] != r["synthetic"] or r["train_demos"] != r["real"] + r["synthetic"]:
            raise RuntimeError(f"{r['name']}: trained on {r['train_demos']} demos ({r['synthetic_demos']} synthetic), "
                               f"expected {r['real']} real + {r['synthetic']} synthetic")

    by = {r["name"]: r["gt_success"] for r in results}
    n, full = args.n, args.real_multiple * args.n
    mixes = {r["kind"]: r["gt_success"] for r in results
             if r["kind"] and r["kind"] not in CONTROLS and r["synthetic"] == max(args.multiples) * n}
    files = {}
    for kind, path in synth.items():
        if not need_synth[kind]:
            continue
        if kind in CONTROLS:
            files[kind] = {**mujoco_summary(synth["new"], path, args.synthetic_key or "train",
                                            frames=kind == "new_in_mujoco"),
                           "starts_of": str(synth["new"]), "actions": CONTROLS[kind]}
            continue
        env_args = read_env_args(path)
        files[kind] = {"file": str(path), "checkpoint": env_args.get("checkpoint"),
                       "checkpoint_hash": env_args.get("checkpoint_hash"), "verdicts": synthetic_summary(path),
                       **({"vs_source": synthetic_fidelity(path, args.source)} if kind == "replayed" else
                          {"policy": args.new_policy})}
    payload = {
        "n": n,
        "rows": results,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "episodes": args.episodes,
        "seeds": [args.seed, args.seed + args.episodes - 1],
        "real_data": args.real,
        "source": args.source or None,
        "synthetic": files,
        "targets": {kind: {"within_10_points_of_all_real": mix >= by[f"real{full}"] - 0.10,
                           "10_points_over_small_real": mix >= by[f"real{n}"] + 0.10} for kind, mix in mixes.items()},
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
    labels = [f"{r['real']} real\n+{r['synthetic']} {r['kind'].replace('_in_', ' in ')}" if r["synthetic"] else
              f"{r['real']} real" for r in rows]
    vals = [r["gt_success"] for r in rows]
    err = [[r["gt_success"] - r["gt_ci95"][0] for r in rows], [r["gt_ci95"][1] - r["gt_success"] for r in rows]]
    colors = [{"replayed": "tab:green", "new": "tab:orange"}.get(r["kind"], "tab:gray" if r["kind"] else "tab:blue")
              for r in rows]
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
