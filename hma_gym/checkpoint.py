"""Checkpoint directories: `config.json` (with a format version) + safetensors files. Never unpickles.

A packed HMA checkpoint holds:

| file | contents |
|---|---|
| `config.json` | format version, env spec (spaces, task, gt id), tokenizer / dynamics / detector configs, provenance |
| `tokenizer.safetensors` | image tokenizer weights |
| `dynamics.safetensors` | HMA world model weights |
| `detector.safetensors`, `detector.json` | success detector weights, its config and decision threshold |
| `detector_normalization.safetensors` | the detector's state statistics |
| `normalization.safetensors` | per-embodiment state/action mean and std |
| `init_bank.safetensors` | ground-truth initial observations (one tensor per observation key) |
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
CHECKPOINT_FILES = (
    "config.json",
    "tokenizer.safetensors",
    "dynamics.safetensors",
    "detector.safetensors",
    "detector.json",
    "detector_normalization.safetensors",
    "normalization.safetensors",
    "init_bank.safetensors",
)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what loads it."""


def save_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomic safetensors write (contiguous CPU copies; shared storage is cloned)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def load_module_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into `module`, naming the file on any mismatch."""
    state = load_tensors(path)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not fit {type(module).__name__}: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {type(module).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def save_module(directory: str | os.PathLike, name: str, module: torch.nn.Module, config: dict) -> None:
    """`name.safetensors` + `name.json` (the module config) in `directory`."""
    directory = Path(directory)
    save_tensors(directory / f"{name}.safetensors", module.state_dict())
    save_json(directory / f"{name}.json", {"format_version": FORMAT_VERSION, "config": config})


def packed_config(directory: str | os.PathLike, name: str) -> dict | None:
    """The config.json of a packed checkpoint directory (which has no run's `name`.json), else None."""
    directory = Path(directory)
    if (directory / f"{name}.json").is_file() or not (directory / "config.json").is_file():
        return None
    return check_checkpoint_dir(directory)


def read_module_config(directory: str | os.PathLike, name: str) -> dict:
    """The config saved beside `name`.safetensors by a training run."""
    meta = load_json(Path(directory) / f"{name}.json")
    check_version(meta, Path(directory) / f"{name}.json")
    return meta["config"]


def check_version(meta: dict, path: Path) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, this hma-gym reads {FORMAT_VERSION}")


def check_checkpoint_dir(directory: str | os.PathLike) -> dict:
    """Validate a packed checkpoint directory and return its config; errors name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for name in CHECKPOINT_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
    config = load_json(directory / "config.json")
    check_version(config, directory / "config.json")
    for key in ("env", "tokenizer", "dynamics", "detector"):
        if key not in config:
            raise CheckpointError(f"{directory / 'config.json'} has no {key!r} section")
    return config


def weights_hash(directory: str | os.PathLike, names: tuple[str, ...] = ()) -> str:
    """sha256 over the checkpoint's safetensors files (names and bytes), first 16 hex digits; ``names``
    (e.g. ``("tokenizer",)``) hashes only those files: one part of a packed checkpoint."""
    h = hashlib.sha256()
    paths = [Path(directory) / f"{n}.safetensors" for n in names] if names else Path(directory).glob("*.safetensors")
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
