"""The training loop every trainer shares: AdamW + warm-up/cosine, JSONL log, eval, exact resume, DDP.

A trainer supplies a model, `batch_fn(step) -> batch`, `loss_fn(model, batch) -> (loss, metrics)`,
`eval_fn(model) -> metrics` and `export_fn(model, step)` (writes the safetensors artefact). The loop
keeps `train_state.pt` in the run directory (model, optimizer, step, RNG states, sampler state) and
resumes from it exactly: an interrupted run continued gives the same weights as an uninterrupted one.
With `ema` on, the loop also keeps an exponential moving average of the weights (in train_state.pt too);
`eval_fn` and `export_fn` then get the averaged model, so evaluation and the exported weights use it.
Under `torchrun` each rank samples its own batches and gradients are averaged by DDP; rank 0 logs and
saves. A non-finite loss or gradient norm stops the run with `NonFiniteError` (naming the step and the
loss terms that are not finite) before the optimizer applies it, and no save writes non-finite weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hma_gym.config import to_jsonable


@dataclass
class LoopConfig:
    """Options shared by every trainer."""

    out: str = "runs/model"
    """Run directory (weights, train_state.pt, log.jsonl)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 16
    """Samples per step (per process under torchrun)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, embeddings)."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 = off)."""
    eval_every: int = 500
    """Held-out evaluation every n steps (and at the end)."""
    save_every: int = 250
    """Write train_state.pt and the exported weights every n steps (and at the end)."""
    log_every: int = 25
    """Training metrics to log.jsonl every n steps."""
    seed: int = 0
    """Seed of parameters, batches and masks."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    bf16: bool = False
    """bf16 autocast. Off by default: on this CPU (AVX2, no AVX-512 BF16) it measured ~4x slower."""
    threads: int = 0
    """torch threads on CPU (0 = torch's default)."""
    resume: bool = True
    """Continue from out/train_state.pt when it exists."""
    ema: bool = False
    """Keep an exponential moving average of the weights; evaluation and the exported weights use it."""
    ema_power: float = 0.75
    """EMA decay after k optimizer steps: 1 - k ** -ema_power (diffusion_policy's schedule), capped by
    ema_max_decay; 0 after the first step, so the average starts from the first update."""
    ema_max_decay: float = 0.9999
    """Upper bound of the EMA decay."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive. Got {name}={getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive. Got {self.lr=}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]. Got {self.min_lr_ratio=}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0. Got {self.warmup=}")
        if not 0 < self.ema_power <= 1:
            raise ValueError(f"ema_power must be in (0, 1]. Got {self.ema_power=}")
        if not 0 <= self.ema_max_decay < 1:
            raise ValueError(f"ema_max_decay must be in [0, 1). Got {self.ema_max_decay=}")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite loss, gradient or weight; nothing non-finite was saved."""


def nonfinite_terms(metrics: dict) -> list[str]:
    """Names of the tensor or float metrics that hold a NaN or infinity."""
    return [k for k, v in metrics.items()
            if (torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v.detach()).all()))
            or (isinstance(v, float) and not math.isfinite(v))]


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Raise `NonFiniteError` naming the first parameter or buffer of `module` that holds a NaN or infinity."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad = int((~torch.isfinite(t.detach())).sum())
            raise NonFiniteError(f"{what}: {name} holds {bad} of {t.numel()} non-finite values; not saved")


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    import torch.distributed as dist

    dist_info = Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info, device


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of Linear/Conv layers only; norms, biases, embeddings and vectors are not decayed."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_matrix = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)) and name == "weight"
            (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EmaTrainee(nn.Module):
    """The trained model plus its EMA copy (no gradients), one module so that train_state.pt holds both."""

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.power, self.max_decay = power, max_decay
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def decay(self, step: int) -> float:
        """The weight of the old average when folding in the weights after `step` optimizer steps."""
        return 0.0 if step <= 1 else min(self.max_decay, 1.0 - step ** -self.power)

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """Fold the weights after `step` optimizer steps into the average (once per step)."""
        if int(self.ema_step) >= step:
            return
        decay = self.decay(step)
        for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            e.copy_(b)
        self.ema_step.fill_(step)


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(to_jsonable(record)) + "\n")


def _scalar(v: Any) -> float:
    return float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)


def train_loop(
    cfg: LoopConfig,
    model: nn.Module,
    batch_fn: Callable[[int, np.random.Generator], dict],
    loss_fn: Callable[[nn.Module, dict], tuple[torch.Tensor, dict]],
    eval_fn: Callable[[nn.Module], dict] | None,
    export_fn: Callable[[nn.Module, int], None],
    run_config: dict,
    trainable: list[nn.Parameter] | None = None,
    desc: str = "train",
    on_step: Callable[[nn.Module, int], None] | None = None,
) -> dict:
    """Run (or resume) training; returns the last eval metrics (or the last train metrics).

    `batch_fn(step, rng)` must draw all its randomness from `rng` (saved for exact resume) and return
    tensors on the CPU; the loop moves them to the device. `trainable` restricts the optimizer (e.g. a
    new embodiment's stem and head only). `eval_fn`, `export_fn` and `on_step(model, step)` (called after
    every optimizer step) get the EMA model when `cfg.ema` is on, else the trained one.
    """
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    dist_info, device = init_distributed(device)
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    trainee = EmaTrainee(model, cfg.ema_power, cfg.ema_max_decay) if cfg.ema else None
    module = trainee if trainee is not None else model  # what is trained and saved
    exported = trainee.ema if trainee is not None else model  # what is evaluated and exported
    module.to(device)
    params = trainable if trainable is not None else None
    groups = param_groups(module, cfg.weight_decay)
    if params is not None:
        keep = {id(p) for p in params}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng([cfg.seed, dist_info.rank])
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)
    step = 0
    state_path = out / "train_state.pt"
    log = JsonlLog(out / "log.jsonl", enabled=dist_info.is_main)
    if cfg.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        has_ema = "ema_step" in state["model"]
        if has_ema != cfg.ema:
            raise ValueError(f"{state_path} was written with ema={has_ema}; resume with the same --ema "
                             f"setting, or start a new run in another --out")
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        log.write({"event": "resume", "step": step})
    elif dist_info.is_main:
        (out / "log.jsonl").unlink(missing_ok=True)
        log.write({"event": "start", "config": run_config, "params": sum(p.numel() for p in model.parameters())})

    net: nn.Module = module
    if dist_info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def save(step: int) -> None:
        if not dist_info.is_main:
            return
        check_finite_weights(module, f"{desc} at step {step}")
        state = {
            "model": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "sampler_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        tmp = state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, state_path)
        export_fn(exported, step)

    def evaluate(step: int) -> dict:
        if eval_fn is None or not dist_info.is_main:
            return {}
        module.eval()
        with torch.no_grad():
            metrics = {k: _scalar(v) for k, v in eval_fn(exported).items()}
        module.train()
        log.write({"event": "eval", "step": step, **metrics})
        return metrics

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.bf16 else _NullContext()
    )
    last: dict = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not (cfg.progress and dist_info.is_main))
    module.train()
    t_log, samples = time.perf_counter(), 0
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batch_fn(step, rng)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast:
            loss, metrics = loss_fn(net, batch)
        if not bool(torch.isfinite(loss.detach()).all()):
            terms = [k for k in nonfinite_terms(metrics) if k != "loss"]
            detail = f" (non-finite terms: {', '.join(terms)})" if terms else ""
            raise NonFiniteError(f"{desc}: non-finite loss {_scalar(loss)} at step {step + 1}{detail}; stopped before "
                                 f"updating the weights (check the data's values and the learning rate)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not bool(torch.isfinite(grad_norm)):
                raise NonFiniteError(f"{desc}: non-finite gradient norm ({float(grad_norm)}) at step {step + 1} "
                                     f"(loss {_scalar(loss):.4g})")
            metrics = {**metrics, "grad_norm": grad_norm}
        optimizer.step()
        step += 1
        if trainee is not None:
            trainee.update_ema(step)
        if on_step is not None:
            on_step(exported, step)
        samples += cfg.batch_size
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            last = {k: _scalar(v) for k, v in metrics.items()}
            log.write({"event": "train", "step": step, "lr": lr_at(step - 1, cfg), **last,
                       "samples_per_s": samples / max(now - t_log, 1e-9)})
            t_log, samples = now, 0
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last = {**last, **evaluate(step)}
        if step % cfg.save_every == 0 or step == cfg.steps:
            save(step)
    bar.close()
    return last


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
