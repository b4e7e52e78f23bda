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
| `state_model.safetensors` | (optional) proprio + object-state dynamics (`hma_gym.models.state_model`) |
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
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


def nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, else None."""
    for name, t in tensors.items():
        if t.is_floating_point():
            t = t.detach().cpu()
            # numpy's single-threaded check: torch's float16 isfinite is ~10x slower on this CPU (2.5 s for the
            # shipped dynamics weights under load, against ~30 ms)
            values = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            if not np.isfinite(values).all():
                return name
    return None


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a file whose tensors hold NaN/inf (a model loaded from it would only produce NaN)."""
    name = nonfinite_tensor(tensors)
    if name is not None:
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN/inf")


def check_statistics(stats: dict[str, torch.Tensor | None], path: str | os.PathLike,
                     sizes: dict[str, int] | None = None) -> None:
    """Normalisation statistics (name -> tensor): present, finite, of `sizes[name]` values where given, and
    every `*_std` positive (inputs are divided by it)."""
    for name, t in stats.items():
        if t is None:
            raise CheckpointError(f"{path} has no {name!r}")
        if sizes and name in sizes and tuple(t.shape) != (sizes[name],):
            raise CheckpointError(f"{path}: {name!r} has shape {tuple(t.shape)}, the model takes ({sizes[name]},)")
    check_finite(stats, path)
    for name, t in stats.items():
        if name.endswith("std") and not bool((t > 0).all()):
            raise CheckpointError(f"{path}: {name!r} must be > 0 everywhere (inputs are divided by it), "
                                  f"got min {float(t.min()):g}")


def load_module_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict into `module`, naming the file on any mismatch or NaN/inf weight."""
    state = load_tensors(path)
    check_finite(state, path)
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
    check_env_config(config, directory / "config.json")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def max_generation_steps(config: dict) -> int:
    """The most unmasking steps a frame can use: one token revealed a step (more would only repeat passes)."""
    return int(config["dynamics"].get("grid", 16)) ** 2


def check_env_config(config: dict, path: Path) -> None:
    """A packed config's `env` section agrees with its model sections (image size, state and action sizes),
    and its `generation` settings are in range; errors name the file and the field."""
    env = config["env"]

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} {why}")

    for key in ("embodiment", "image_key", "image_size", "proprio", "action_dim"):
        if key not in env:
            raise bad(f"env.{key}", "is missing")
    size, tokenizer_size = env["image_size"], config["tokenizer"].get("image_size")
    if not _is_int(size) or size < 8:
        raise bad("env.image_size", f"must be an integer >= 8, got {size!r}")
    if tokenizer_size is not None and tokenizer_size != size:
        raise bad("env.image_size", f"is {size} but the tokenizer takes {tokenizer_size}x{tokenizer_size} images")
    proprio = env["proprio"]
    if not isinstance(proprio, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and _is_int(p[1]) and p[1] > 0
        for p in proprio
    ):
        raise bad("env.proprio", f"must be a list of [key, size > 0] pairs, got {proprio!r}")
    embodiments = config["dynamics"].get("embodiments", {})
    spec = embodiments.get(env["embodiment"])
    if spec is None:
        raise bad("env.embodiment", f"{env['embodiment']!r} is not one of the dynamics model's {sorted(embodiments)}")
    state_dim = sum(dim for _, dim in proprio)
    if state_dim != spec.get("state_dim"):
        raise bad("env.proprio", f"has {state_dim} state values but the dynamics model's {env['embodiment']!r} "
                                 f"embodiment takes {spec.get('state_dim')}")
    if env["action_dim"] != spec.get("action_dim"):
        raise bad("env.action_dim", f"is {env['action_dim']!r} but the dynamics model's {env['embodiment']!r} "
                                    f"embodiment takes {spec.get('action_dim')}")
    limit = env.get("max_episode_steps")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise bad("env.max_episode_steps", f"must be a positive integer or null, got {limit!r}")

    generation = config.get("generation", {})
    steps, top = generation.get("steps", 2), max_generation_steps(config)
    if not _is_int(steps) or not 1 <= steps <= top:
        raise bad("generation.steps", f"must be an integer in [1, {top}] (the tokens of a frame), got {steps!r}")
    temperature = generation.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise bad("generation.temperature", f"must be a finite number > 0, got {temperature!r}")
    frames = generation.get("success_frames", 1)
    if not _is_int(frames) or frames < 1:
        raise bad("generation.success_frames", f"must be an integer >= 1, got {frames!r}")
    threshold = generation.get("success_threshold", 0.5)
    if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise bad("generation.success_threshold", f"must be in (0, 1), got {threshold!r}")


def weights_hash(directory: str | os.PathLike, names: tuple[str, ...] = ()) -> str:
    """sha256 over the checkpoint's safetensors files (names and bytes), first 16 hex digits; ``names``
    (e.g. ``("tokenizer",)``) hashes only those files: one part of a packed checkpoint."""
    h = hashlib.sha256()
    paths = [Path(directory) / f"{n}.safetensors" for n in names] if names else Path(directory).glob("*.safetensors")
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
