"""The learned simulator's engine: tokenizer + HMA dynamics + normalisation + success detector.

`WorldModel` is what the learned env, the vector env and `eval-model` all step:

    wm = WorldModel.from_checkpoint(path)
    cache = wm.new_cache(n)
    wm.observe(cache, wm.encode(frames), states)                 # a known (prompt) frame
    tokens, states = wm.generate(cache, actions, generator=g)    # the next frame
    wm.observe(cache, tokens, states, prev_actions=actions)      # ... becomes history
    frames = wm.decode(tokens); p = wm.success_prob(frames, states)

States and actions enter and leave in their raw units; normalisation happens inside. A checkpoint with a
`state_model` (`hma_gym.models.state_model`) carries the proprio + object-state dynamics that the learned env
takes its low-dimensional observations and verdicts from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from hma_gym.checkpoint import (
    CheckpointError,
    check_checkpoint_dir,
    check_statistics,
    load_json,
    load_module_weights,
    load_tensors,
    packed_config,
    read_module_config,
)
from hma_gym.models.hma import HMA, HMACache, HMAConfig
from hma_gym.models.state_model import STATE_MODEL_NAME, StateModel, StateModelConfig
from hma_gym.models.tokenizer import ImageTokenizer, TokenizerConfig


def _only_fields(cls, d: dict) -> dict:
    return {k: v for k, v in d.items() if k in cls.__dataclass_fields__}


def tokenizer_config(directory: str | os.PathLike) -> dict:
    """The config of a `train-tokenizer` run (tokenizer.json), or of a packed checkpoint's tokenizer (the
    same dict, as config.json's "tokenizer" section)."""
    packed = packed_config(directory, "tokenizer")
    return packed["tokenizer"] if packed else read_module_config(directory, "tokenizer")


def load_tokenizer(directory: str | os.PathLike) -> ImageTokenizer:
    """A tokenizer saved by `train-tokenizer` (tokenizer.json + tokenizer.safetensors), or a packed
    checkpoint's."""
    cfg = tokenizer_config(directory)
    model = ImageTokenizer(TokenizerConfig.from_dict(_only_fields(TokenizerConfig, cfg)))
    load_module_weights(model, Path(directory) / "tokenizer.safetensors")
    return model.eval()


def load_dynamics(directory: str | os.PathLike) -> tuple[HMA, dict]:
    """An HMA saved by `train` (dynamics.json + dynamics.safetensors) and its run metadata; a packed
    checkpoint directory (config.json, e.g. the shipped one) works too, its float16 weights in float32."""
    packed = packed_config(directory, "dynamics")
    if packed:
        meta = {"hma": packed["dynamics"], "packed": True,
                "trained_steps": packed.get("provenance", {}).get("dynamics_trained_steps")}
    else:
        meta = read_module_config(directory, "dynamics")
    model = HMA(HMAConfig.from_dict(meta["hma"]))
    load_module_weights(model, Path(directory) / "dynamics.safetensors")
    return model.eval(), meta


def load_state_model(directory: str | os.PathLike) -> StateModel | None:
    """The checkpoint's proprio + object-state dynamics (`state_model.safetensors`), or None if it has none."""
    directory = Path(directory)
    path = directory / f"{STATE_MODEL_NAME}.safetensors"
    if not path.is_file():
        return None
    config = load_json(directory / "config.json")
    if STATE_MODEL_NAME not in config:
        raise CheckpointError(f"{path} exists but {directory / 'config.json'} has no {STATE_MODEL_NAME!r} section")
    model = StateModel(StateModelConfig.from_dict(config[STATE_MODEL_NAME]))
    load_module_weights(model, path)
    check_statistics({name: getattr(model, name) for name in
                      ("state_mean", "state_std", "delta_mean", "delta_std", "action_mean", "action_std")}, path)
    return model.float().eval()


class WorldModel(nn.Module):
    """Tokenizer + HMA + normaliser (+ success detector) behind raw-unit, batched calls."""

    def __init__(
        self,
        tokenizer: ImageTokenizer,
        dynamics: HMA,
        normalization: dict[str, torch.Tensor],
        embodiment: str,
        detector: nn.Module | None = None,
        detector_normalization: dict[str, torch.Tensor] | None = None,
        threshold: float = 0.5,
        state_model: StateModel | None = None,
    ):
        super().__init__()
        self.state_model = state_model
        if embodiment not in dynamics.config.embodiments:
            raise CheckpointError(f"embodiment {embodiment!r} not in the model ({dynamics.embodiment_names})")
        self.tokenizer, self.dynamics, self.detector = tokenizer, dynamics, detector
        self.embodiment = embodiment
        self.embodiment_index = dynamics.embodiment_id(embodiment)
        spec = dynamics.config.embodiments[embodiment]
        self.state_dim, self.action_dim = spec.state_dim, spec.action_dim
        self.threshold = float(threshold)
        self.compiled = False  # compile_inference() ran
        for name in ("state_mean", "state_std", "action_mean", "action_std"):
            key = f"{embodiment}/{name}" if f"{embodiment}/{name}" in normalization else name
            if key not in normalization:
                raise CheckpointError(f"normalisation statistics have no {key!r}")
            self.register_buffer(name, normalization[key].float().clone())
        det = detector_normalization or {}
        self.register_buffer("det_state_mean", det.get("state_mean", self.state_mean).float().clone())
        self.register_buffer("det_state_std", det.get("state_std", self.state_std).float().clone())

    @property
    def device(self) -> torch.device:
        return self.state_mean.device

    @property
    def image_size(self) -> int:
        return self.tokenizer.cfg.image_size

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> WorldModel:
        """Load a packed checkpoint directory (see `hma_gym.checkpoint`)."""
        from hma_gym.models.detector import load_detector

        directory = Path(directory)
        config = check_checkpoint_dir(directory)
        tokenizer, dynamics = load_tokenizer(directory), load_dynamics(directory)[0]
        detector, threshold, det_norm = load_detector(directory)
        norm = load_tensors(directory / "normalization.safetensors")
        embodiment = config["env"]["embodiment"]
        spec = dynamics.config.embodiments[embodiment]  # check_checkpoint_dir: the env's embodiment is the model's
        sizes = {"state_mean": spec.state_dim, "state_std": spec.state_dim,
                 "action_mean": spec.action_dim, "action_std": spec.action_dim}
        check_statistics({name: norm.get(f"{embodiment}/{name}", norm.get(name)) for name in sizes},
                         directory / "normalization.safetensors", sizes)
        check_statistics(det_norm, directory / "detector_normalization.safetensors")
        model = cls(tokenizer, dynamics, norm, embodiment, detector, det_norm, threshold, load_state_model(directory))
        return model.to(device).eval()

    def compile_inference(self) -> WorldModel:
        """``torch.compile`` the per-step hot paths in place: the dynamics trunk, the tokenizer's decoder
        and the success detector (``dynamic=False``: one graph per batch size and kind of pass).

        Meant for inference. The first steps after this one compile (about a minute on a 2-core CPU; inductor
        caches its kernels on disk, so a later process starts faster); after that a single learned-env
        step is about 1.2x faster on that CPU (`python -m benchmarks.env_speed`, rows "-compiled").
        Outputs match the eager model's up to float rounding; weights and state_dict keys are unchanged.
        Needs a C++ compiler on CPU (inductor).
        """
        if not self.compiled:
            self.dynamics.compile_trunk()
            self.tokenizer.decoder.compile(dynamic=False)
            if self.detector is not None:
                self.detector.compile(dynamic=False)
            self.compiled = True
        return self

    # ------------------------------------------------------------------ images
    @property
    def continuous(self) -> bool:
        """A continuous (mar) world model: its tokens are the tokenizer's latents, not codes."""
        return self.dynamics.config.continuous

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) frames -> tokens (B, g, g); mar: latents (B, g, g, C) float32."""
        if self.continuous:
            return self.tokenizer.encode_latent(frames.to(self.device)).permute(0, 2, 3, 1).contiguous()
        return self.tokenizer.encode(frames.to(self.device))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, g, g) or latents (B, g, g, C) -> uint8 (B, H, W, 3) frames."""
        if tokens.is_floating_point():
            x = self.tokenizer.decode_latent(tokens.to(self.device).permute(0, 3, 1, 2)).clamp(0, 1)
            return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return self.tokenizer.decode_uint8(tokens.to(self.device))

    # ------------------------------------------------------------------ dynamics
    def new_cache(self, batch_size: int) -> HMACache:
        return self.dynamics.new_cache(batch_size)

    def _ids(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.embodiment_index, dtype=torch.long, device=self.device)

    def _norm_action(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions.to(self.device).float() - self.action_mean) / self.action_std

    @torch.no_grad()
    def observe(
        self,
        cache: HMACache,
        tokens: torch.Tensor,
        states: torch.Tensor,
        prev_actions: torch.Tensor | None = None,
        action_valid: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Append a known frame (tokens + raw state, reached by raw `prev_actions`) to the history.

        `rows` (B,) bool limits the append to some rows (the others keep their history).
        """
        s = (states.to(self.device).float() - self.state_mean) / self.state_std
        a = None if prev_actions is None else self._norm_action(prev_actions)
        self.dynamics.append_frame(cache, tokens.to(self.device), s, a, self._ids(len(tokens)), action_valid,
                                   rows=None if rows is None else rows.to(self.device), return_hidden=False)

    @torch.no_grad()
    def generate(
        self,
        cache: HMACache,
        actions: torch.Tensor,
        steps: int = 2,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        diffusion_steps: int | None = None,
        return_uncertainty: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sample the frame that raw `actions` (B, A) lead to: tokens (B, g, g) and raw states (B, S); with
        `return_uncertainty`, also the (B,) entropies of `HMA.generate_frame`."""
        out = self.dynamics.generate_frame(
            cache, self._norm_action(actions), self._ids(len(actions)), steps=steps, temperature=temperature,
            generator=generator, greedy=greedy, diffusion_steps=diffusion_steps, return_uncertainty=return_uncertainty,
        )
        states = out[1][:, : self.state_dim].float() * self.state_std + self.state_mean
        return (out[0], states, *out[2:])

    # ------------------------------------------------------------------ success
    @torch.no_grad()
    def success_prob(self, frames: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Success detector probability for uint8 frames (B, H, W, 3) and raw states (B, S)."""
        if self.detector is None:
            raise CheckpointError("this world model has no success detector")
        s = (states.to(self.device).float() - self.det_state_mean) / self.det_state_std
        return self.detector.predict_proba(frames.to(self.device), s)
