"""Train several `hma-gym train` runs side by side on one machine within a wall-clock budget.

Used for the GPU-trained Lift checkpoints (see docs/checkpoints.md): the runs share one GPU, so
each one's speed is measured first with a short probe of all runs together; then every run gets the
number of steps it can finish in `--budget` seconds (rounded down to 100), so its cosine schedule ends
on time. Each run's weights are written as fp16 beside its config, statistics and log, and packed into
one tar file split in parts (for transfer limits).

    python scripts/parallel_train.py --budget 300 --out OUT \\
        --run A "--tokens T --d-model 160 --n-layer 4 ..." --run B "..."
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PROBE_STEPS = 60


def launch(name: str, args: str, root: Path, steps: int, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hma_gym.cli", "train", *shlex.split(args), "--out", str(out),
           "--steps", str(steps), "--no-progress", "--no-resume", *extra]
    (out / "command.txt").write_text(shlex.join(cmd) + "\n")
    log = open(out / "stdout.txt", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out


def steps_per_s(run_dir: Path, batch_size: int) -> float:
    """Optimizer steps/s from log.jsonl's train records, the first (warm-up) left out."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r.get("event") == "train"][1:]
    if not rates:
        raise RuntimeError(f"{run_dir}: probe logged no timed steps; see {run_dir / 'stdout.txt'}")
    return sum(rates) / len(rates) / batch_size


def batch_size_of(args: str) -> int:
    parts = shlex.split(args)
    return int(parts[parts.index("--batch-size") + 1]) if "--batch-size" in parts else 8


def to_fp16(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(dst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=2, action="append", metavar=("NAME", "ARGS"), required=True,
                        help="a run name and its `hma-gym train` arguments (one string)")
    parser.add_argument("--budget", type=float, default=300, help="wall-clock seconds of the real runs")
    parser.add_argument("--root", default="/tmp/parallel_runs", help="where runs are written")
    parser.add_argument("--out", required=True, help="folder for the packed result (runs.tar.part*)")
    parser.add_argument("--part-mb", type=int, default=15, help="size of each tar part")
    args = parser.parse_args()
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"budget_s": args.budget, "runs": {}}

    # 1. probe: all runs together, a few steps each, to measure their shared-machine speed
    t0 = time.perf_counter()
    probes = [launch(name, a, root / "probe", PROBE_STEPS,
                     ["--log-every", "10", "--eval-every", "100000", "--save-every", "100000", "--eval-windows", "1"])
              for name, a in args.run]
    for proc, _ in probes:
        proc.wait()
    print(f"probe took {time.perf_counter() - t0:.0f} s", flush=True)
    plan = {}
    for (name, a), (proc, run_dir) in zip(args.run, probes, strict=True):
        if proc.returncode:
            print((run_dir / "stdout.txt").read_text()[-3000:], flush=True)
            raise SystemExit(f"probe of {name} failed")
        rate = steps_per_s(run_dir, batch_size_of(a))
        steps = max(100, int(rate * args.budget) // 100 * 100)
        plan[name] = steps
        summary["runs"][name] = {"args": a, "probe_steps_per_s": rate, "steps": steps}
        print(f"{name}: {rate:.1f} steps/s -> {steps} steps", flush=True)

    # 2. the real runs, side by side
    t0 = time.perf_counter()
    runs = []
    for name, a in args.run:
        quarter = max(1, plan[name] // 4)
        runs.append(launch(name, a, root, plan[name], ["--eval-every", str(quarter), "--save-every", str(quarter)]))
    for (name, _), (proc, run_dir) in zip(args.run, runs, strict=True):
        try:
            proc.wait(timeout=max(10, args.budget * 1.3 - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"{name}: over time, killed (its last save is kept)", flush=True)
        summary["runs"][name]["returncode"] = proc.returncode
        summary["runs"][name]["wall_s"] = time.perf_counter() - t0
        print(f"{name}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode:
            print((run_dir / "stdout.txt").read_text()[-3000:], flush=True)

    # 3. pack: fp16 weights, config, statistics, logs
    tar_path = root / "runs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, _ in args.run:
            run_dir = root / name
            weights = run_dir / "dynamics.safetensors"
            if weights.exists():
                to_fp16(weights, run_dir / "dynamics_fp16.safetensors")
            for f in ("dynamics_fp16.safetensors", "dynamics.json", "normalization.safetensors", "log.jsonl",
                      "report.json", "command.txt", "stdout.txt"):
                if (run_dir / f).exists():
                    tar.add(run_dir / f, arcname=f"{name}/{f}")
    data = tar_path.read_bytes()
    step = args.part_mb * 1024 * 1024
    for i in range(0, len(data), step):
        (out / f"runs.tar.part{i // step}").write_bytes(data[i : i + step])
    (out / "parallel_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
