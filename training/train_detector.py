"""`hma-gym train-detector`: fit the success detector on ground-truth success labels.

Every frame of the file's train demos is a sample (frame + normalised proprio -> success). Batches are
class-balanced (half success frames, half not: success frames are a minority) and augmented so the
detector does not key on pixel-exact details the world model will not reproduce: random shifts of a few
pixels, brightness/contrast/colour jitter, a random blur (generated frames are softer) and Gaussian
pixel noise, plus a little noise on the normalised state. Held-out metrics are computed on every frame
of the valid demos at a fixed decision threshold (never tuned on them).

Writes to `out/`: `detector.safetensors` + `detector.json` (config and threshold),
`detector_normalization.safetensors` (state mean/std), `metrics.json`, `log.jsonl`, `train_state.pt`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hma_gym.checkpoint import save_json, save_module, save_tensors
from hma_gym.config import to_jsonable
from hma_gym.data.hdf5 import DatasetError
from hma_gym.models.detector import DETECTOR_NAME, NORM_FILE, DetectorConfig, SuccessDetector
from training.data import DataConfig, Episode, Normalizer, load_episodes
from training.loop import LoopConfig, train_loop


@dataclass
class DetectorTrainConfig(LoopConfig, DataConfig):
    """Train the success detector (frame + proprio -> success) on a robomimic HDF5 file."""

    out: str = "runs/detector"
    """Run directory (detector.safetensors, detector.json, detector_normalization.safetensors, log.jsonl)."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 64
    """Frames per step, half success and half not."""
    lr: float = 1e-3
    """Peak learning rate."""
    eval_every: int = 250
    """Held-out evaluation every n steps (and at the end)."""
    patch: int = 4
    """Stem of the detector: a patch x patch conv with stride patch."""
    channels: tuple[int, ...] = (32, 64, 64)
    """Width of the detector's stem, then of each 3x3 stride-2 conv stage."""
    hidden: int = 128
    """Width of the image feature and of the fused MLP."""
    state_hidden: int = 64
    """Width of the state MLP."""
    dropout: float = 0.1
    """Dropout in the detector's head."""
    use_state: bool = True
    """Feed the normalised proprio vector beside the image (off: image only)."""
    threshold: float = 0.5
    """Decision threshold on the success probability (stored with the weights)."""
    aug_shift: int = 3
    """Random shift of the frame by up to this many pixels (edge-padded)."""
    aug_brightness: float = 0.08
    """Brightness jitter: add U(-a, a) to pixels in [0, 1] (plus a third of it per colour channel)."""
    aug_contrast: float = 0.15
    """Contrast jitter: scale around the frame mean by U(1-a, 1+a)."""
    aug_blur: float = 0.5
    """Probability of mixing the frame with a 3x3 box blur of itself (weight U(0, 1))."""
    aug_noise: float = 0.03
    """Gaussian pixel noise with a std drawn from U(0, a) per frame."""
    state_noise: float = 0.05
    """Std of Gaussian noise added to the normalised state."""

    def __post_init__(self):
        LoopConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        self.channels = tuple(int(c) for c in self.channels)
        for name in ("aug_shift", "aug_brightness", "aug_contrast", "aug_noise", "state_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0. Got {name}={getattr(self, name)}")
        if not 0 <= self.aug_blur <= 1:
            raise ValueError(f"aug_blur must be in [0, 1]. Got {self.aug_blur=}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1). Got {self.threshold=}")
        self.detector_config(state_dim=1)  # validates channels, hidden, state_hidden, dropout

    def detector_config(self, state_dim: int) -> DetectorConfig:
        return DetectorConfig(
            image_size=self.image_size, state_dim=state_dim if self.use_state else 0, patch=self.patch,
            channels=self.channels,
            hidden=self.hidden, state_hidden=self.state_hidden, dropout=self.dropout,
        )

    def data_config(self) -> DataConfig:
        return DataConfig(**{f.name: getattr(self, f.name) for f in fields(DataConfig)})


# ----------------------------------------------------------------------------- data


@dataclass
class FrameSet:
    """All frames of some episodes, flattened: frames (N, H, W, 3) uint8, states (N, S) normalised, labels (N,)."""

    frames: np.ndarray
    states: np.ndarray
    labels: np.ndarray
    episode: np.ndarray  # (N,) index of the episode each frame came from

    @classmethod
    def from_episodes(cls, episodes: list[Episode], norm: Normalizer) -> FrameSet:
        return cls(
            frames=np.concatenate([e.frames for e in episodes]),
            states=norm.norm_state(np.concatenate([e.states for e in episodes])).astype(np.float32),
            labels=np.concatenate([e.success for e in episodes]).astype(bool),
            episode=np.concatenate([np.full(len(e), i) for i, e in enumerate(episodes)]),
        )


def augment(images: np.ndarray, rng: np.random.Generator, cfg: DetectorTrainConfig) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> augmented float32 (B, 3, H, W) in [0, 1].

    Per-frame jitter factors come from `rng`, the pixel noise from torch's global RNG (both are saved
    for exact resume); the work is done in torch, ~4x faster than numpy here.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    b, _, h, w = x.shape

    def draw(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(low, high, size=(b, *shape)).astype(np.float32))

    s = cfg.aug_shift
    if s > 0:
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if cfg.aug_blur > 0:  # generated frames are softer than rendered ones
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        mix = torch.from_numpy(((rng.random(b) < cfg.aug_blur) * rng.random(b)).astype(np.float32))
        x = torch.lerp(x, blurred, mix.view(b, 1, 1, 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = draw(1 - cfg.aug_contrast, 1 + cfg.aug_contrast, 1, 1, 1)
    shift = draw(-cfg.aug_brightness, cfg.aug_brightness, 1, 1, 1)
    shift = shift + draw(-cfg.aug_brightness / 3, cfg.aug_brightness / 3, 3, 1, 1)  # colour cast
    x = (x - mean) * contrast + (mean + shift)
    if cfg.aug_noise > 0:
        x = x + draw(0, cfg.aug_noise, 1, 1, 1) * torch.randn(x.shape)
    return x.clamp_(0.0, 1.0)


def balanced_batch(data: FrameSet, rng: np.random.Generator, cfg: DetectorTrainConfig) -> dict[str, torch.Tensor]:
    """Half success frames, half not, augmented."""
    pos, neg = np.flatnonzero(data.labels), np.flatnonzero(~data.labels)
    n_pos = cfg.batch_size // 2
    idx = np.concatenate([pos[rng.integers(0, len(pos), n_pos)],
                          neg[rng.integers(0, len(neg), cfg.batch_size - n_pos)]])
    states = data.states[idx]
    if cfg.state_noise > 0:
        states = states + cfg.state_noise * rng.standard_normal(states.shape)
    return {
        "images": augment(data.frames[idx], rng, cfg),  # (B, 3, H, W)
        "states": torch.from_numpy(states.astype(np.float32)),  # (B, S)
        "labels": torch.from_numpy(data.labels[idx].astype(np.float32)),  # (B,)
    }


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: SuccessDetector, data: FrameSet, chunk: int = 512) -> np.ndarray:
    """Success probabilities (N,) of every frame in `data` (eval mode, no augmentation)."""
    probs = [model.predict_proba(torch.from_numpy(data.frames[i : i + chunk]),
                                 torch.from_numpy(data.states[i : i + chunk]))
             for i in range(0, len(data.labels), chunk)]
    return torch.cat(probs).cpu().numpy()


def classification_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Balanced accuracy, recall/precision of the success class, accuracy and the threshold used."""
    pred = probs >= threshold
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    recall = tp / max(tp + fn, 1)
    specificity = tn / max(tn + fp, 1)
    eps = 1e-7
    p = np.clip(probs, eps, 1 - eps)
    return {
        "balanced_accuracy": (recall + specificity) / 2,
        "recall": recall,
        "precision": tp / max(tp + fp, 1),
        "specificity": specificity,
        "accuracy": (tp + tn) / max(len(labels), 1),
        "bce": float(-(labels * np.log(p) + (~labels) * np.log(1 - p)).mean()),
        "threshold": threshold,
        "frames": len(labels),
        "success_frames": int(labels.sum()),
    }


def episode_agreement(probs: np.ndarray, data: FrameSet, threshold: float) -> float:
    """Fraction of episodes where "some frame is a success" agrees between detector and ground truth."""
    n = int(data.episode.max()) + 1
    pred = np.zeros(n, bool)
    true = np.zeros(n, bool)
    np.logical_or.at(pred, data.episode, probs >= threshold)
    np.logical_or.at(true, data.episode, data.labels)
    return float((pred == true).mean())


def ms_per_frame(model: SuccessDetector, data: FrameSet, repeats: int = 5, calls: int = 50) -> float:
    """Best-of-`repeats` mean latency of `predict_proba` on one uint8 frame, on the CPU (the env's case)."""
    cpu = copy.deepcopy(model).cpu().eval()
    image, state = torch.from_numpy(data.frames[:1]), torch.from_numpy(data.states[:1])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            cpu.predict_proba(image, state)
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                cpu.predict_proba(image, state)
            best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e3


# ----------------------------------------------------------------------------- training


def train_detector(cfg: DetectorTrainConfig) -> dict:
    """Train (or resume) the detector; returns the held-out metrics (also printed as JSON)."""
    data_cfg = cfg.data_config()
    train_eps = load_episodes(data_cfg, "train", progress=cfg.progress)
    valid_eps = load_episodes(data_cfg, "valid", progress=cfg.progress)
    normalizer = Normalizer.fit(train_eps)
    train, valid = FrameSet.from_episodes(train_eps, normalizer), FrameSet.from_episodes(valid_eps, normalizer)
    n_pos = int(train.labels.sum())
    if n_pos == 0 or n_pos == len(train.labels):
        raise DatasetError(
            f"{cfg.data}: the train demos hold {n_pos} success frames of {len(train.labels)}; "
            f"the detector needs both classes"
        )

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.detector_config(state_dim=train.states.shape[1])
    model = SuccessDetector(model_cfg)
    out = Path(cfg.out)

    def batch_fn(step: int, rng: np.random.Generator) -> dict:
        return balanced_batch(train, rng, cfg)

    def loss_fn(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = net(batch["images"], batch["states"])  # (B,)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"])
        acc = ((logits > 0).float() == batch["labels"]).float().mean()
        return loss, {"loss": loss, "accuracy": acc}

    def eval_fn(m: nn.Module) -> dict:
        probs = predict(m, valid)
        metrics = classification_metrics(probs, valid.labels, cfg.threshold)
        return {**metrics, "episode_agreement": episode_agreement(probs, valid, cfg.threshold)}

    def export_fn(m: nn.Module, step: int) -> None:
        save_module(out, DETECTOR_NAME, m, {"detector": model_cfg.to_dict(), "threshold": cfg.threshold,
                                            "step": step, "data": str(cfg.data)})
        save_tensors(out / NORM_FILE, normalizer.tensors())

    run_config = {**to_jsonable(cfg), "detector": model_cfg.to_dict(), "train_frames": len(train.labels),
                  "train_success_frames": n_pos, "valid_frames": len(valid.labels)}
    train_loop(cfg, model, batch_fn, loss_fn, eval_fn, export_fn, run_config, desc="detector")

    # final held-out numbers, also when a finished run is resumed (the loop then evaluates nothing)
    model.eval()
    with torch.no_grad():
        metrics = eval_fn(model)
    result = {**metrics, "params": model.num_params(), "ms_per_frame_cpu": ms_per_frame(model, valid),
              "train_frames": len(train.labels), "train_success_frames": n_pos, "out": str(out)}
    if int(os.environ.get("RANK", "0")) == 0:
        save_json(out / "metrics.json", result)
        print(json.dumps(result, indent=2))
    return result
