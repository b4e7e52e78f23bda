"""`hma-gym train-tokenizer`: the FSQ image tokenizer, trained from scratch on a file's frames."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hma_gym.checkpoint import save_module
from hma_gym.models.tokenizer import ImageTokenizer, TokenizerConfig, tokenizer_presets
from training.data import DataConfig, load_episodes
from training.loop import LoopConfig, train_loop


@dataclass
class TokenizerTrainConfig(LoopConfig, DataConfig):
    """Train the image tokenizer (64x64 -> 16x16 FSQ codes) on the frames of a robomimic file."""

    out: str = "runs/tokenizer"
    """Run directory; tokenizer.safetensors + tokenizer.json are written here."""
    preset: str = "small"
    """Tokenizer size preset (tiny, small, base)."""
    levels: tuple[int, ...] = ()
    """FSQ levels per latent channel (the codebook size is their product; empty: the preset's, 8 5 5 5 =
    1,000 codes). More codes reconstruct better but give a dynamics model a larger output layer."""
    temporal_weight: float = 0.05
    """Weight of the temporal-consistency term on consecutive-frame pairs (0 = off)."""
    steps: int = 4000
    """Optimizer steps."""
    batch_size: int = 32
    """Frames per step (consecutive pairs count twice)."""
    lr: float = 2e-3
    """Peak learning rate."""
    eval_frames: int = 512
    """Held-out frames used for PSNR and token stability."""
    init_from: str = ""
    """Start from the weights of a trained tokenizer directory (e.g. to fine-tune its decoder)."""
    freeze_encoder: bool = False
    """Train the decoder only: the codes of every frame stay exactly as they are, so a world model trained
    on them stays valid, while reconstruction quality improves."""

    def __post_init__(self):
        LoopConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        if self.preset not in tokenizer_presets:
            raise ValueError(f"preset must be one of {sorted(tokenizer_presets)}. Got {self.preset=}")
        self.levels = tuple(int(v) for v in self.levels)
        self.model_config()  # its own checks (e.g. every level >= 2) at parse time

    def data_config(self) -> DataConfig:
        return DataConfig(**{k: getattr(self, k) for k in DataConfig.__dataclass_fields__})

    def model_config(self) -> TokenizerConfig:
        base = tokenizer_presets[self.preset]()
        levels = {"levels": self.levels} if self.levels else {}
        return TokenizerConfig.from_dict({**base.to_dict(), "image_size": self.image_size,
                                          "temporal_weight": self.temporal_weight, **levels})


def _frame_pairs(episodes) -> tuple[np.ndarray, np.ndarray]:
    """All frames of the episodes, and for each the index of its successor (itself at an episode end)."""
    frames = np.concatenate([e.frames for e in episodes])
    nxt, offset = [], 0
    for e in episodes:
        n = len(e.frames)
        nxt.append(offset + np.minimum(np.arange(1, n + 1), n - 1))
        offset += n
    return frames, np.concatenate(nxt)


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict:
    data = cfg.data_config()
    train_frames, train_next = _frame_pairs(load_episodes(data, "train", progress=cfg.progress))
    valid_frames, valid_next = _frame_pairs(load_episodes(data, "valid", progress=cfg.progress))
    pick = np.random.default_rng(0).permutation(len(valid_frames))[: cfg.eval_frames]
    eval_a = torch.from_numpy(valid_frames[pick])
    eval_b = torch.from_numpy(valid_frames[valid_next[pick]])

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config()
    model = ImageTokenizer(model_cfg)
    trainable = None
    if cfg.init_from:
        from hma_gym.world_model import load_tokenizer as load_trained

        source = load_trained(cfg.init_from)
        if source.cfg.to_dict() | {"temporal_weight": 0} != model_cfg.to_dict() | {"temporal_weight": 0}:
            raise ValueError(f"--init-from {cfg.init_from}: its config {source.cfg.to_dict()} differs from "
                             f"{model_cfg.to_dict()}")
        model.load_state_dict(source.state_dict())
    if cfg.freeze_encoder:
        if not cfg.init_from:
            raise ValueError("--freeze-encoder needs --init-from (a trained encoder)")
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        trainable = list(model.decoder.parameters())

    def batch_fn(step: int, rng: np.random.Generator) -> dict:
        idx = rng.integers(0, len(train_frames), cfg.batch_size // 2 if cfg.temporal_weight > 0 else cfg.batch_size)
        batch = {"images": torch.from_numpy(train_frames[idx])}
        if cfg.temporal_weight > 0:
            batch["prev"] = batch["images"]
            batch["images"] = torch.from_numpy(train_frames[train_next[idx]])
        return batch

    def loss_fn(model, batch):
        _, losses = model(batch["images"], batch.get("prev"))
        return losses["loss"], losses

    def eval_fn(model) -> dict:
        device = next(model.parameters()).device
        psnr, stable = [], []
        for i in range(0, len(eval_a), 128):
            a, b = eval_a[i : i + 128].to(device), eval_b[i : i + 128].to(device)
            _, losses = model(a, b)
            psnr.append(float(losses["psnr"]) * len(a))
            stable.append(float(losses["token_stability"]) * len(a))
        return {"valid_psnr": sum(psnr) / len(eval_a), "valid_token_stability": sum(stable) / len(eval_a)}

    def export_fn(model, step: int) -> None:
        save_module(cfg.out, "tokenizer", model, {**model_cfg.to_dict(), "trained_steps": step,
                                                  "data": cfg.data, "image_key": cfg.image_key})

    run_config = {"command": "train-tokenizer", **asdict(cfg), "model": model_cfg.to_dict()}
    metrics = train_loop(cfg, model, batch_fn, loss_fn, eval_fn, export_fn, run_config, trainable=trainable,
                         desc="tokenizer")
    report = {"out": cfg.out, "params": model.num_params(), **metrics}
    Path(cfg.out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report

