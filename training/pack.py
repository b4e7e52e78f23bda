"""`hma-gym pack`: assemble one checkpoint directory that `gym.make(..., checkpoint=DIR)` loads."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hma_gym.checkpoint import (
    FORMAT_VERSION,
    check_checkpoint_dir,
    load_json,
    load_tensors,
    read_module_config,
    save_json,
    save_tensors,
    weights_hash,
)
from hma_gym.data.hdf5 import list_demos, read_demo, read_env_args
from hma_gym.world_model import tokenizer_config
from training.data import resize_frames


@dataclass
class PackConfig:
    """Bundle tokenizer, dynamics model, success detector, statistics and initial observations."""

    out: str
    """Checkpoint directory to write (replaced if it exists)."""
    tokenizer: str = "runs/tokenizer"
    """train-tokenizer run directory, or a packed checkpoint (its tokenizer)."""
    dynamics: str = "runs/dynamics"
    """train run directory."""
    detector: str = "runs/detector"
    """train-detector run directory, or a packed checkpoint (its detector)."""
    data: str = ""
    """robomimic file whose train-split initial observations form the reset bank (default: the dynamics run's)."""
    bank_size: int = 200
    """At most this many initial observations."""
    gt_env_id: str = ""
    """Ground-truth env id this checkpoint mirrors (default: from the data file's env_args)."""
    max_episode_steps: int = 100
    """Episode limit the learned env id registers with."""
    generation_steps: int = 2
    """Default MaskGIT unmasking steps."""
    temperature: float = 1.0
    """Default sampling temperature."""
    greedy: bool = False
    """Default to argmax decoding (deterministic given the start) instead of sampling."""
    recipe: str = ""
    """Free text: the commands that produced the parts (stored in config.json)."""
    half: bool = True
    """Store the weights as float16 (half the size; loading casts them back to the model's float32)."""
    success_rule_from: str = ""
    """Copy the success rule (generation.success_threshold/_frames) from this packed checkpoint, e.g. one
    calibrated with the same detector (`calibrate-success --write` calibrates this one instead)."""

    def __post_init__(self):
        if self.bank_size < 1:
            raise ValueError(f"bank_size must be >= 1. Got {self.bank_size=}")


def pack(cfg: PackConfig) -> dict:
    dyn_meta = read_module_config(cfg.dynamics, "dynamics")
    tok_cfg = tokenizer_config(cfg.tokenizer)
    det_meta = load_json(Path(cfg.detector) / "detector.json")
    data = cfg.data or dyn_meta["data"]
    env_args = read_env_args(data)
    image_key, proprio_keys = dyn_meta["image_key"], dyn_meta["proprio_keys"]

    names = list_demos(data, "train")[: cfg.bank_size]
    bank: dict[str, list[np.ndarray]] = {k: [] for k in (image_key, *proprio_keys)}
    for name in names:
        demo = read_demo(data, name, keys=[image_key, *proprio_keys])
        for key in bank:
            bank[key].append(demo["obs"][key][0])
    bank_arrays = {k: np.stack(v) for k, v in bank.items()}
    bank_arrays[image_key] = resize_frames(bank_arrays[image_key], int(tok_cfg["image_size"]))

    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for source, name in ((cfg.tokenizer, "tokenizer"), (cfg.dynamics, "dynamics"), (cfg.detector, "detector")):
        weights = load_tensors(Path(source) / f"{name}.safetensors")
        if cfg.half:
            weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        save_tensors(out / f"{name}.safetensors", weights)
    for name in ("detector.json", "detector_normalization.safetensors"):
        shutil.copy(Path(cfg.detector) / name, out / name)
    shutil.copy(Path(cfg.dynamics) / "normalization.safetensors", out / "normalization.safetensors")
    save_tensors(out / "init_bank.safetensors",
                 {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bank_arrays.items()})

    env_kwargs = env_args.get("env_kwargs", {})
    config = {
        "format_version": FORMAT_VERSION,
        "kind": "hma-checkpoint",
        "variant": dyn_meta["hma"].get("head", "maskgit"),
        "env": {
            "gt_env_id": cfg.gt_env_id or env_args.get("env_id", ""),
            "task": env_args.get("env_name"),
            "embodiment": dyn_meta["embodiment"],
            "image_key": image_key,
            "image_size": int(tok_cfg["image_size"]),
            "proprio": [[k, int(bank_arrays[k].shape[1])] for k in proprio_keys],
            "action_dim": int(dyn_meta["hma"]["embodiments"][dyn_meta["embodiment"]]["action_dim"]),
            "action_stride": int(dyn_meta.get("action_stride", 1)),
            "control_freq": int(env_kwargs.get("control_freq", 20)),
            "max_episode_steps": cfg.max_episode_steps,
        },
        "tokenizer": tok_cfg,
        "dynamics": dyn_meta["hma"],
        "detector": det_meta["config"],  # also in detector.json, which the detector loader reads
        "generation": {"steps": cfg.generation_steps, "temperature": cfg.temperature, "greedy": cfg.greedy},
        "provenance": {
            "data": data,
            "bank_demos": len(names),
            "tokenizer_run": cfg.tokenizer,
            "dynamics_run": cfg.dynamics,
            "detector_run": cfg.detector,
            "dynamics_trained_steps": dyn_meta.get("trained_steps"),
            "tokenizer_trained_steps": tok_cfg.get("trained_steps"),
            "recipe": cfg.recipe,
            "pack_config": asdict(cfg),
        },
    }
    if cfg.success_rule_from:
        rule = load_json(Path(cfg.success_rule_from) / "config.json").get("generation", {})
        missing = {"success_threshold", "success_frames"} - set(rule)
        if missing:
            raise ValueError(f"{cfg.success_rule_from}/config.json has no {sorted(missing)} (calibrate it first)")
        config["generation"].update(success_threshold=rule["success_threshold"], success_frames=rule["success_frames"])
        config["provenance"]["success_rule_from"] = cfg.success_rule_from  # copied, not calibrated for this model
    save_json(out / "config.json", config)
    check_checkpoint_dir(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    report = {"out": str(out), "bytes": size, "weights_hash": weights_hash(out), "bank": len(names)}
    print(json.dumps(report, indent=2))
    return report
