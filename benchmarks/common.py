"""Shared helpers for benchmarks: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def write_result(name: str, payload: dict, module: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "python -m benchmarks." + (module or name) + " " + " ".join(sys.argv[1:]),
               "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def learned_env_kwargs(target: str) -> dict:
    """A shipped variant ("maskgit", "mar", "fast", "fsq15k") -> {"variant": target}; a packed checkpoint directory ->
    {"checkpoint": target}: the gym.make kwargs of a benchmark's learned env."""
    from hma_gym.envs.learned_env import VARIANTS

    if target in VARIANTS:
        return {"variant": target}
    if Path(target).is_dir():
        return {"checkpoint": target}
    raise ValueError(f"{target!r}: a variant is one of {sorted(VARIANTS)} or a packed checkpoint directory "
                     f"(no such directory: {target!r})")


def hma(*args: str) -> list[str]:
    return [sys.executable, "-m", "hma_gym.cli", *args]


def run(cmd: list[str], log: Path) -> None:
    print("$ " + shlex.join(cmd[2:] if cmd[1] == "-m" else cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n(log {log})\n{tail}")
