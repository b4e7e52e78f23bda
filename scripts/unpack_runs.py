"""Unpack what `scripts/parallel_train.py` wrote (e.g. on a lent GPU machine) into run directories here.

    python scripts/unpack_runs.py outputs/gpu15k runs/gpu15k

joins PARTS_DIR/runs.tar.part0, part1, ... and extracts each run to ROOT/NAME/, its fp16 weights as
dynamics.safetensors, so ROOT/NAME is a valid `--dynamics` for `hma-gym pack` and `--init` for `train`.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path


def unpack(parts_dir: str | Path, root: str | Path) -> list[Path]:
    parts = sorted(Path(parts_dir).glob("runs.tar.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"{parts_dir}: no runs.tar.part* files (scripts/parallel_train.py --out writes them)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(root, filter="data")  # refuses absolute paths, links out of root, ...
        names = sorted({Path(m.name).parts[0] for m in tar.getmembers()})
    runs = []
    for name in names:
        run = root / name
        half = run / "dynamics_fp16.safetensors"
        if half.exists():
            half.replace(run / "dynamics.safetensors")
        runs.append(run)
        print(f"{run}: {', '.join(sorted(p.name for p in run.iterdir()))}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts_dir", help="the folder holding runs.tar.part*")
    parser.add_argument("root", help="where the run directories go")
    args = parser.parse_args()
    unpack(args.parts_dir, args.root)


if __name__ == "__main__":
    main()
