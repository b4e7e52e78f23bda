"""`hma-gym tokenize`: a robomimic file's episodes as tokenizer codes, in one small safetensors file.

Training the dynamics model needs only codes, proprio, actions and success labels, which are ~25x
smaller than the frames: the cache lets `hma-gym train --tokens CACHE` run where the HDF5 file is not
(e.g. a GPU machine reached by copying a few MB). Held-out episodes keep their frames, since the
periodic evaluation measures PSNR against them. The cache records the tokenizer's weights hash and
`train` refuses a cache made by another tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hma_gym.checkpoint import weights_hash
from hma_gym.data.hdf5 import DatasetError
from hma_gym.world_model import load_tokenizer
from training.data import DataConfig, Episode, load_episodes
from training.fidelity import tokenize_episodes

SPLITS = ("train", "valid")
FIELDS = ("tokens", "states", "actions", "success")


class TokenCacheError(DatasetError):
    """A token cache is missing, malformed or made by another tokenizer."""


@dataclass
class TokenizeConfig(DataConfig):
    """Pre-tokenise a robomimic file (and --extra-data files) for `hma-gym train --tokens`."""

    tokenizer: str = "runs/tokenizer"
    """Directory of a trained tokenizer (train-tokenizer)."""
    out: str = "data/lift_tokens.safetensors"
    """Output cache file."""
    max_valid_episodes: int = 0
    """Keep at most this many held-out episodes (evenly spaced; their frames are most of the file's size);
    0 = all."""
    threads: int = 0
    """torch threads (0 = torch's default)."""
    progress: bool = True
    """Show a progress bar."""


def save_token_cache(path: str | os.PathLike, splits: dict[str, list[Episode]], meta: dict) -> None:
    """Write episodes (with tokens) of each split; frames are kept for the valid split only."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, list[str]] = {}
    for split, episodes in splits.items():
        if any(e.tokens is None for e in episodes):
            raise ValueError("every episode needs tokens before it is cached")
        names[split] = [e.name for e in episodes]
        tensors[f"{split}/lengths"] = torch.tensor([len(e) for e in episodes], dtype=torch.int64)
        tensors[f"{split}/tokens"] = torch.from_numpy(np.concatenate([e.tokens for e in episodes]))
        tensors[f"{split}/states"] = torch.from_numpy(np.concatenate([e.states for e in episodes]))
        tensors[f"{split}/actions"] = torch.from_numpy(np.concatenate([e.actions for e in episodes]))
        tensors[f"{split}/success"] = torch.from_numpy(np.concatenate([e.success for e in episodes]).astype(np.uint8))
        if split == "valid":
            tensors[f"{split}/frames"] = torch.from_numpy(np.concatenate([e.frames for e in episodes]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"meta": json.dumps(meta), "names": json.dumps(names)})
    os.replace(tmp, path)


def load_token_cache(path: str | os.PathLike) -> tuple[dict[str, list[Episode]], dict]:
    """Episodes per split (train episodes have no frames) and the cache's metadata."""
    path = Path(path)
    if not path.is_file():
        raise TokenCacheError(f"{path}: no token cache (make one with `hma-gym tokenize`)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        meta, names = json.loads(header["meta"]), json.loads(header["names"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise TokenCacheError(f"{path}: not a token cache ({e})") from e
    splits: dict[str, list[Episode]] = {}
    for split in SPLITS:
        if f"{split}/lengths" not in tensors:
            raise TokenCacheError(f"{path}: no {split!r} split")
        lengths = tensors[f"{split}/lengths"].tolist()
        bounds = np.cumsum([0, *lengths])
        arrays = {k: tensors[f"{split}/{k}"].numpy() for k in FIELDS}
        frames = tensors[f"{split}/frames"].numpy() if f"{split}/frames" in tensors else None
        episodes = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            episodes.append(Episode(
                name=names[split][i],
                frames=frames[a:b] if frames is not None else np.zeros((0, 1, 1, 3), np.uint8),
                states=arrays["states"][a:b],
                actions=arrays["actions"][a - i : b - i - 1],
                success=arrays["success"][a:b].astype(bool),
                tokens=arrays["tokens"][a:b],
            ))
        splits[split] = episodes
    return splits, meta


def tokenize(cfg: TokenizeConfig) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg.tokenizer)
    data = DataConfig(**{k: getattr(cfg, k) for k in DataConfig.__dataclass_fields__})
    data.image_size = tokenizer.cfg.image_size
    splits = {s: load_episodes(data, s, progress=cfg.progress) for s in SPLITS}
    if 0 < cfg.max_valid_episodes < len(splits["valid"]):
        keep = np.linspace(0, len(splits["valid"]) - 1, cfg.max_valid_episodes).round().astype(int)
        splits["valid"] = [splits["valid"][i] for i in keep]
    with torch.no_grad():
        for episodes in splits.values():
            tokenize_episodes(tokenizer, episodes)
    meta = {"tokenizer": cfg.tokenizer, "tokenizer_hash": weights_hash(cfg.tokenizer),
            "data": asdict(data), "codebook_size": tokenizer.codebook_size, "grid": tokenizer.cfg.grid}
    save_token_cache(cfg.out, splits, meta)
    report = {"out": cfg.out, "bytes": Path(cfg.out).stat().st_size,
              **{f"{s}_episodes": len(e) for s, e in splits.items()},
              **{f"{s}_frames": sum(len(x) for x in e) for s, e in splits.items()}}
    print(json.dumps(report, indent=2))
    return report
