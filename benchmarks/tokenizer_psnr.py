"""Tokenizer reconstruction on every held-out frame of a robomimic file: encode to codes, decode, round
to uint8 (what the env shows), PSNR and SSIM against the original frame.

    python -m benchmarks.tokenizer_psnr --data data/lift.hdf5 --tokenizers hma_gym/assets/lift runs/tok_fsq15k

A tokenizer is a `train-tokenizer` run directory or a packed checkpoint (its tokenizer). Unlike the
training log's `valid_psnr` (512 frames, float output), every frame of the file's `mask/valid` demos
counts. Writes benchmarks/results/tokenizer_psnr.json (`--name` sets the file).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import write_result
from hma_gym.checkpoint import weights_hash
from hma_gym.metrics import psnr, ssim
from hma_gym.world_model import load_tokenizer
from training.data import DataConfig, load_episodes


@torch.no_grad()
def reconstruction(tokenizer, frames: np.ndarray, batch: int = 256, progress: bool = True) -> dict:
    """Per-frame PSNR / SSIM of uint8 frames (N, H, W, 3) through codes and back, summarised."""
    p, s = [], []
    for i in tqdm(range(0, len(frames), batch), desc="frames", disable=not progress, leave=False):
        x = torch.from_numpy(frames[i : i + batch])
        y = tokenizer.decode_uint8(tokenizer.encode(x))
        p.append(psnr(y, x))
        s.append(ssim(y, x))
    p, s = np.concatenate(p), np.concatenate(s)
    return {"frames": len(p), "psnr_mean": float(p.mean()), "psnr_median": float(np.median(p)),
            "psnr_p10": float(np.percentile(p, 10)), "ssim_mean": float(s.mean())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/lift.hdf5", help="robomimic-layout HDF5 file")
    ap.add_argument("--split", default="valid", help="mask key whose demos are scored")
    ap.add_argument("--tokenizers", nargs="+", default=["hma_gym/assets/lift"],
                    help="train-tokenizer run directories or packed checkpoints")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--name", default="tokenizer_psnr", help="result file name under benchmarks/results/")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows, frames = [], {}  # frames by image size: read once
    for path in args.tokenizers:
        tok = load_tokenizer(path).eval()
        size = tok.cfg.image_size
        if size not in frames:
            data = DataConfig(data=args.data, image_size=size)
            frames[size] = np.concatenate([e.frames for e in load_episodes(data, args.split, progress=False)])
        rows.append({"tokenizer": path, "weights_hash": weights_hash(path, ("tokenizer",)),
                     "codebook_size": tok.codebook_size, "levels": list(tok.cfg.levels), "params": tok.num_params(),
                     **reconstruction(tok, frames[size], progress=args.progress)})
        print({k: rows[-1][k] for k in ("tokenizer", "codebook_size", "frames", "psnr_mean", "ssim_mean")})
    payload = {"data": args.data, "split": args.split, "rows": rows}
    write_result(args.name, payload, module="tokenizer_psnr")
    return payload


if __name__ == "__main__":
    main()
