"""Heterogeneous pre-training study (the paper's Tables 3-4): from scratch vs pre-trained + fine-tuned.

One HMA is pre-trained on a mixture of other embodiments (`--mixture`, see training/mixture.py; Lift
with the Panda is not in it). Then the same small Lift-Panda budget (`--lift-demos` of `--lift`'s train
split) trains two models with the same fine-tuning compute (`--finetune-steps` optimizer steps each):

- scratch: a fresh model of the same architecture;
- pretrained: the pre-trained model gets a new Panda stem and head, trained alone for
  `--new-stem-steps` steps (trunk frozen), then everything is fine-tuned for the remaining steps.

Both are evaluated on the same held-out Lift windows (`--lift`'s valid split, 4 GT prompt frames, 8
generated frames): PSNR, dPSNR (true vs random actions), perplexity of the first MaskGIT step, and
PSNR* (PSNR under small action perturbations: the generated frames against the GT simulator run from
the same MuJoCo state with the same perturbed actions). The pre-training compute is reported
separately.

Steps run as the project's CLI commands (printed as they start), `--jobs` at a time, one thread each;
a re-run resumes unfinished training runs and reuses finished ones.

    python -m benchmarks.pretraining --mixture benchmarks/pretraining_mixture.json --lift data/lift.hdf5 \\
        --tokenizer runs/tokenizer --pretrain-steps 1000 --finetune-steps 400 --train-seeds 0 1 --jobs 2

Writes `benchmarks/results/pretraining.json` (`embodiments`, `rows: [{init, psnr, delta_psnr, perplexity,
psnr_perturbed}]`) and a bar plot `pretraining.png` (`--name NAME`: NAME.json and NAME.png).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, hma, run, write_result

LIFT_EMBODIMENT = "panda_osc_pose"
METRICS = ("psnr", "delta_psnr", "perplexity", "psnr_perturbed", "ssim", "copy_last_prompt_psnr",
           "copy_last_prompt_psnr_perturbed", "tokenizer_ceiling_psnr", "eef_pos_mae_m")


def trained_steps(run_dir: Path) -> int:
    meta = run_dir / "dynamics.json"
    return int(json.loads(meta.read_text())["config"]["trained_steps"]) if meta.exists() else 0


def train_step(args, out: Path, steps: int, extra: list[str], model_args: list[str]) -> float:
    """Run (or resume, or skip when done) one `hma-gym train`; returns its wall minutes this time."""
    if trained_steps(out) >= steps:
        return 0.0
    t0 = time.perf_counter()
    run(hma("train", "--tokenizer", args.tokenizer, "--out", str(out), "--steps", str(steps), *model_args,
            *extra), out.with_suffix(".log"))  # a step's own flags come last and win
    return (time.perf_counter() - t0) / 60


def train_minutes(run_dir: Path) -> float:
    """Optimizer time of a run from its log (each logged interval: log_every x batch samples at the
    logged samples/s), so it is known also when the run was made by an earlier invocation."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    cfg = next(r["config"] for r in log if r["event"] == "start")
    train = [r for r in log if r["event"] == "train"]
    return sum(cfg["log_every"] * cfg["batch_size"] / r["samples_per_s"] for r in train) / 60


def perturbed_gt_frames(lift: str, seed_base: int, episodes, windows, actions: np.ndarray,
                        image_size: int) -> np.ndarray:
    """GT frames of each window's 8 generated steps under `actions` (N, 11, A).

    MuJoCo's state alone does not restore robosuite's controller, so each window is replayed from its
    episode's start: `reset(seed=...)` with the demo's `seed` attribute (files written before it was
    recorded: `seed_base + N` for demo_N, how `hma-gym collect` seeds episodes), the recorded actions up
    to the window's last prompt frame, then the window's (perturbed) actions."""
    import gymnasium as gym
    import h5py

    import hma_gym  # noqa: F401  (registers the ids)
    from hma_gym.metrics import psnr

    with h5py.File(lift, "r") as f:
        seeds = {e.name: int(f[f"data/{e.name}"].attrs.get("seed", seed_base + int(e.name.split("_")[-1])))
                 for e in episodes}
    env = gym.make("RobomimicLift-v0", image_size=image_size, terminate_on_success=False).unwrapped
    out = []
    for (i, s), act in zip(windows, actions, strict=True):
        name, seed = episodes[i].name, seeds[episodes[i].name]
        obs, _ = env.reset(seed=seed)
        first = float(np.mean(psnr(obs["agentview_image"], episodes[i].frames[0])))
        if first < 25:
            raise RuntimeError(f"{lift}/{name}: reset(seed={seed}) does not give the recorded first frame "
                               f"({first:.1f} dB); pass the file's collection seed as --lift-seed")
        for a in episodes[i].actions[: s + 3]:  # stride 1: the recorded control actions
            env.step(a)
        frames = []
        for a in act[3:]:
            obs, *_ = env.step(a)
            frames.append(obs["agentview_image"])
        out.append(np.stack(frames))
    env.close()
    return np.stack(out)


EVAL_KEYS = ("lift", "tokenizer", "eval_windows", "n_random", "perturb_std", "lift_seed", "seed")


def evaluate(args, run_dir: Path) -> dict:
    """`_evaluate`, reused from run_dir/pretraining_eval.json when the weights and settings are the same."""
    from hma_gym.checkpoint import weights_hash

    cache = run_dir / "pretraining_eval.json"
    key = {"weights": weights_hash(run_dir), **{k: getattr(args, k) for k in EVAL_KEYS}}
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = _evaluate(args, run_dir)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def _evaluate(args, run_dir: Path) -> dict:
    """Fidelity of one fine-tuned model on the held-out Lift windows (fixed by --seed)."""
    from hma_gym.checkpoint import load_tensors
    from hma_gym.metrics import psnr
    from hma_gym.world_model import WorldModel, load_dynamics, load_tokenizer
    from training.data import DataConfig, load_episodes
    from training.fidelity import eval_windows, fidelity_report, open_loop, tokenize_episodes

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    model, _ = load_dynamics(run_dir)
    wm = WorldModel(tokenizer, model, load_tensors(run_dir / "normalization.safetensors"), LIFT_EMBODIMENT).eval()
    episodes = load_episodes(DataConfig(data=args.lift, image_size=tokenizer.cfg.image_size), "valid")
    tokenize_episodes(wm, episodes)
    windows = eval_windows(episodes, 12, 8)
    rng = np.random.default_rng(args.seed)
    windows = [windows[k] for k in sorted(rng.permutation(len(windows))[: args.eval_windows])]
    report = fidelity_report(wm, episodes, windows, n_random=args.n_random, seed=args.seed)
    # PSNR*: the same windows with perturbed actions, against MuJoCo run with those actions
    true = np.stack([episodes[i].actions[s : s + 11] for i, s in windows])
    noise = np.random.default_rng(args.seed + 1).normal(0.0, args.perturb_std, true.shape)
    noise[:, :3] = 0.0  # the prompt's actions stay the recorded ones
    perturbed = np.clip(true + noise, -1.0, 1.0).astype(np.float32)
    gt = perturbed_gt_frames(args.lift, args.lift_seed, episodes, windows, perturbed, tokenizer.cfg.image_size)
    res = open_loop(wm, episodes, windows, actions=perturbed, seed=args.seed)
    p_star = psnr(res["pred"], gt).reshape(len(windows), -1)
    copy_star = psnr(np.repeat(res["prompt_last"][:, None], gt.shape[1], 1), gt).reshape(len(windows), -1)
    return {
        "psnr": report["psnr"],
        "delta_psnr": report["delta_psnr"],
        "perplexity": report["perplexity"],
        "psnr_perturbed": float(p_star.mean()),
        "ssim": report["ssim"],
        "psnr_per_frame": report["psnr_per_frame"],
        "psnr_perturbed_per_frame": p_star.mean(0).tolist(),
        "copy_last_prompt_psnr": report["copy_last_prompt_psnr"],
        "copy_last_prompt_psnr_perturbed": float(copy_star.mean()),
        "tokenizer_ceiling_psnr": report["tokenizer_ceiling_psnr"],
        "eef_pos_mae_m": report["eef_pos_mae_m"],
        "windows": len(windows),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("psnr", "PSNR (dB)"), ("psnr_perturbed", "PSNR* (dB)"), ("delta_psnr", "dPSNR (dB)"),
            ("perplexity", "perplexity")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, (k, label) in zip(axes, keys, strict=True):
        vals = [r[k] for r in rows]
        ax.bar([r["init"] for r in rows], vals, color=["#999999", "#4c72b0"][: len(rows)])
        for x, r in enumerate(rows):
            ax.text(x, vals[x], f"{vals[x]:.2f}", ha="center", va="bottom", fontsize=8)
            ax.plot([x] * len(r["per_seed"]), [q[k] for q in r["per_seed"]], "k.", ms=4)  # each seed
        ax.set_title(label, fontsize=9)
        if k in ("psnr", "psnr_perturbed"):
            copy = rows[0]["copy_last_prompt_psnr" + ("_perturbed" if k == "psnr_perturbed" else "")]
            ax.axhline(copy, color="r", lw=0.8, ls="--", label="copy last prompt frame")
            ax.set_ylim(min(vals + [copy]) - 2, max(vals + [copy]) + 1)
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("Lift-Panda, same fine-tuning compute: scratch vs heterogeneous pre-training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mixture", default="benchmarks/pretraining_mixture.json", help="pre-training mixture JSON")
    p.add_argument("--lift", default="data/lift.hdf5", help="Lift-Panda robomimic file (fine-tuning and eval)")
    p.add_argument("--tokenizer", default="runs/tokenizer", help="tokenizer run shared by every model")
    p.add_argument("--lift-demos", type=int, default=50, help="fine-tuning budget: first n train demos")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--finetune-steps", type=int, default=400, help="optimizer steps of each arm on Lift")
    p.add_argument("--new-stem-steps", type=int, default=50,
                   help="of --finetune-steps: the new Panda stem/head alone, trunk frozen")
    p.add_argument("--model", default="--preset small --d-model 128 --n-layer 3 --n-head 4 --patch-size 2 "
                   '--objective-probs {"forward":0.8,"full":0.1,"passive":0.05,"policy":0.05}',
                   help="architecture flags of `hma-gym train` (split at spaces)")
    p.add_argument("--train", default="--batch-size 8 --lr 0.0015 --warmup 50 --min-lr-ratio 0.1 "
                   "--weight-decay 0.05 --prompt-frames 1 4 --save-every 50 --eval-windows 16 --threads 1 "
                   "--no-progress", help="optimisation flags shared by every run")
    p.add_argument("--mixture-power", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=48, help="held-out Lift windows evaluated")
    p.add_argument("--n-random", type=int, default=5, help="random action sequences for dPSNR")
    p.add_argument("--perturb-std", type=float, default=0.1, help="std of the action perturbation for PSNR*")
    p.add_argument("--lift-seed", type=int, default=0, help="the --seed --lift was collected with")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0],
                   help="each arm is trained once per seed; rows give the mean and every seed")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (windows, sampling, perturbations)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="runs/pretraining")
    p.add_argument("--name", default="pretraining",
                   help="result name: writes benchmarks/results/NAME.json and NAME.png")
    args = p.parse_args(argv)
    if not 0 <= args.new_stem_steps < args.finetune_steps:
        p.error("--new-stem-steps must lie in [0, --finetune-steps)")
    work = Path(args.work)
    model_args = [*args.model.split(), *args.train.split()]
    lift = ["--data", args.lift, "--max-demos", str(args.lift_demos), "--embodiment", LIFT_EMBODIMENT]
    t0 = time.perf_counter()
    minutes: dict[str, float] = {}

    def tag(seed: int) -> str:  # seed 0 runs keep the plain names
        return "" if seed == 0 else f"_s{seed}"

    def pretrain():
        minutes["pretrain"] = train_step(args, work / "pretrained", args.pretrain_steps,
                                         ["--mixture", args.mixture, "--mixture-power", str(args.mixture_power),
                                          "--eval-every", str(args.pretrain_steps // 2)], model_args)

    def scratch(seed: int):
        minutes[f"scratch{tag(seed)}"] = train_step(
            args, work / f"scratch{tag(seed)}", args.finetune_steps,
            [*lift, "--eval-every", str(args.finetune_steps), "--seed", str(seed)], model_args)

    def finetune(seed: int):
        stem = work / f"pretrained_new_stem{tag(seed)}"
        if args.new_stem_steps:
            minutes[f"new_stem{tag(seed)}"] = train_step(
                args, stem, args.new_stem_steps,
                [*lift, "--init", str(work / "pretrained"), "--trainable", "new-embodiments", "--seed", str(seed),
                 "--warmup", str(max(1, args.new_stem_steps // 5)), "--eval-every", str(args.new_stem_steps)],
                model_args)
        minutes[f"finetune{tag(seed)}"] = train_step(
            args, work / f"finetuned{tag(seed)}", args.finetune_steps - args.new_stem_steps,
            [*lift, "--init", str(stem if args.new_stem_steps else work / "pretrained"), "--seed", str(seed),
             "--eval-every", str(args.finetune_steps)], model_args)

    with ThreadPoolExecutor(args.jobs) as pool:  # pre-training and the scratch arm need nothing else
        pre = pool.submit(pretrain)
        done = [pool.submit(scratch, seed) for seed in args.train_seeds]
        pre.result()
        done += [pool.submit(finetune, seed) for seed in args.train_seeds]
        for f in done:
            f.result()

    runs = {(init, seed): work / f"{name}{tag(seed)}" for seed in args.train_seeds
            for init, name in (("scratch", "scratch"), ("pretrained", "finetuned"))}
    with ThreadPoolExecutor(args.jobs) as pool:
        evals = dict(zip(runs, pool.map(lambda d: evaluate(args, d), runs.values()), strict=True))
    rows = []
    for init in ("scratch", "pretrained"):
        per_seed = [{"seed": seed, **evals[(init, seed)]} for seed in args.train_seeds]
        mean = {k: float(np.mean([r[k] for r in per_seed])) for k in METRICS}
        rows.append({"init": init, **mean, "per_seed": per_seed})
    pre_meta = json.loads((work / "pretrained" / "dynamics.json").read_text())["config"]
    embodiments = sorted({*pre_meta["hma"]["embodiments"], LIFT_EMBODIMENT})
    pre_log = [json.loads(line) for line in (work / "pretrained" / "log.jsonl").read_text().splitlines()]
    pre_eval = [r for r in pre_log if r["event"] == "eval"]
    payload = {
        "embodiments": len(embodiments),
        "embodiment_names": embodiments,
        "rows": rows,
        "pretraining": {"mixture": args.mixture, "datasets": pre_meta.get("datasets"), "steps": args.pretrain_steps,
                        "samples": args.pretrain_steps * pre_log[0]["config"]["batch_size"],
                        "params": pre_log[0].get("params"),
                        "eval_first_dataset": pre_eval[-1] if pre_eval else None},
        "finetuning": {"lift": args.lift, "demos": args.lift_demos, "steps": args.finetune_steps,
                       "new_stem_steps": args.new_stem_steps, "model": args.model, "train": args.train},
        "eval": {"windows": args.eval_windows, "n_random": args.n_random, "perturb_std": args.perturb_std,
                 "protocol": "4 GT prompt frames, 8 generated from the model's own outputs; PSNR* against the "
                             "GT env replayed from the episode's seeded start with the recorded actions, then the "
                             "same perturbed actions as the model"},
        "train_seeds": args.train_seeds,
        "checkpoints": {f"{k[0]}_seed{k[1]}": str(v) for k, v in runs.items()}
        | {"pretrained_base": str(work / "pretrained")},
        "train_minutes_1_cpu_thread": {name: train_minutes(work / name) for name in sorted(
            [*(f"{n}{tag(k)}" for k in args.train_seeds for n in ("scratch", "finetuned")), "pretrained",
             *(f"pretrained_new_stem{tag(k)}" for k in args.train_seeds if args.new_stem_steps)])},
        "wall_minutes_this_run": minutes,
        "total_wall_minutes_this_run": (time.perf_counter() - t0) / 60,
    }
    write_result(args.name, payload, module="pretraining")
    plot(rows, RESULTS / f"{args.name}.png")
    return payload


if __name__ == "__main__":
    main()
