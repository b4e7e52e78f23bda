"""The Diffusion Policy network: fitted normaliser, image encoder, conditional 1-D U-Net, DDPM loss and sampler.

`DiffusionModel.forward(batch)` is the training loss (DDPM noise prediction); `DiffusionModel.sample(...)`
generates an action chunk with the DDIM (or DDPM) scheduler. Both follow Chi et al. 2023 (CNN variant):
observations of `n_obs_steps` frames are encoded to one global condition vector that modulates every U-Net
block through FiLM, together with the diffusion step embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from policies.diffusion.config import DiffusionPolicyConfig

# ----------------------------------------------------------------------------- normaliser


class FieldNormalizer(nn.Module):
    """Min-max to [-1, 1] per dimension; `scale`/`offset` are buffers (saved in the state dict).

    A dimension whose fitted range is below `range_eps` is only centred (scale 1), so a constant input
    does not blow up to infinity.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("low", torch.full((dim,), -1.0))
        self.register_buffer("high", torch.ones(dim))

    @torch.no_grad()
    def fit(self, data: torch.Tensor, range_eps: float = 1e-4) -> None:
        """`data`: (N, dim) raw values."""
        data = data.reshape(-1, self.scale.shape[0]).to(self.scale)
        low, high = data.min(0).values, data.max(0).values
        span = high - low
        flat = span < range_eps
        scale = torch.where(flat, torch.ones_like(span), 2.0 / span.clamp_min(range_eps))
        offset = torch.where(flat, -(high + low) / 2, -1.0 - scale * low)
        self.scale.copy_(scale)
        self.offset.copy_(offset)
        self.low.copy_(low)
        self.high.copy_(high)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.offset) / self.scale


class Normalizer(nn.Module):
    """The fitted normalisers of a policy (diffusion_policy-style: part of the policy's state dict)."""

    def __init__(self, proprio_dim: int, action_dim: int):
        super().__init__()
        self.proprio = FieldNormalizer(proprio_dim)
        self.action = FieldNormalizer(action_dim)


# ----------------------------------------------------------------------------- image encoder


def crop_images(images: torch.Tensor, size: int, offsets: torch.Tensor | None) -> torch.Tensor:
    """Crop (B, T, H, W, C) to (B, T, size, size, C); `offsets` (B, 2) top-left corners, None = centre.

    One crop per sample, shared by its T frames (the motion between frames stays intact).
    """
    b, _, h, w, _ = images.shape
    if size == h and size == w:
        return images
    if offsets is None:
        top, left = (h - size) // 2, (w - size) // 2
        return images[:, :, top : top + size, left : left + size]
    ar = torch.arange(size, device=images.device)
    rows = (offsets[:, 0:1].to(images.device) + ar)[:, None, :, None]  # (B, 1, size, 1)
    cols = (offsets[:, 1:2].to(images.device) + ar)[:, None, None, :]  # (B, 1, 1, size)
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ti = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[bi, ti, rows, cols]  # (B, T, size, size, C)


class ResBlock2d(nn.Module):
    """ResNet basic block with GroupNorm (BatchNorm's batch statistics do not mix with EMA / small batches)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.skip(x))


class SpatialSoftmax(nn.Module):
    """Feature map (B, C, H, W) -> expected (x, y) of `num_kp` learned keypoints, (B, 2 * num_kp)."""

    def __init__(self, channels: int, num_kp: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, num_kp, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        attn = self.proj(x).flatten(2).softmax(-1)  # (B, K, H*W)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=attn.dtype),
                                torch.linspace(-1, 1, w, device=x.device, dtype=attn.dtype), indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], -1)  # (H*W, 2)
        return (attn @ grid).flatten(1)  # (B, 2K)


class ImageEncoder(nn.Module):
    """uint8 images (N, h, w, 3) -> features (N, image_feature_dim): conv stem, residual stages, keypoints."""

    def __init__(self, cfg: DiffusionPolicyConfig):
        super().__init__()
        ch = cfg.encoder_channels
        self.stem = nn.Sequential(nn.Conv2d(3, ch[0], 3, 2, 1, bias=False), nn.GroupNorm(cfg.n_groups, ch[0]),
                                  nn.ReLU())
        self.stages = nn.Sequential(*[ResBlock2d(a, b, 2, cfg.n_groups) for a, b in zip(ch[:-1], ch[1:], strict=True)])
        if cfg.num_keypoints > 0:
            self.pool: nn.Module = SpatialSoftmax(ch[-1], cfg.num_keypoints)
            pooled = 2 * cfg.num_keypoints
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            pooled = ch[-1]
        self.out = nn.Linear(pooled, cfg.image_feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, h, w) in [-1, 1]
        x = self.stages(self.stem(x))  # (N, C, h / 2^k, w / 2^k)
        return self.out(self.pool(x))  # (N, F)


# ----------------------------------------------------------------------------- conditional 1-D U-Net


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / max(half - 1, 1))
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([args.sin(), args.cos()], -1)  # (B, dim)


class Conv1dBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out), nn.Mish())


class ConditionalResBlock1d(nn.Module):
    """Two conv blocks; the condition scales and shifts the first one's output (FiLM)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel, groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)  # (B, C, T)
        scale, shift = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        h = self.block2(h * scale + shift)
        return h + self.skip(x)


class ConditionalUnet1d(nn.Module):
    """Noisy action chunk (B, T, A), diffusion steps (B,), condition (B, D) -> prediction (B, T, A)."""

    def __init__(self, action_dim: int, global_cond_dim: int, cfg: DiffusionPolicyConfig):
        super().__init__()
        dsed, k, g = cfg.diffusion_step_embed_dim, cfg.kernel_size, cfg.n_groups
        self.step_encoder = nn.Sequential(SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(),
                                          nn.Linear(4 * dsed, dsed))
        cond_dim = dsed + global_cond_dim
        dims = [action_dim, *cfg.down_dims]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down.append(nn.ModuleList([
                ConditionalResBlock1d(a, b, cond_dim, k, g), ConditionalResBlock1d(b, b, cond_dim, k, g),
                nn.Identity() if last else nn.Conv1d(b, b, 3, 2, 1),
            ]))
        mid = dims[-1]
        self.mid = nn.ModuleList([ConditionalResBlock1d(mid, mid, cond_dim, k, g) for _ in range(2)])
        self.up = nn.ModuleList()
        for a, b in reversed(in_out[1:]):  # every level but the first upsamples back
            self.up.append(nn.ModuleList([
                ConditionalResBlock1d(2 * b, a, cond_dim, k, g), ConditionalResBlock1d(a, a, cond_dim, k, g),
                nn.ConvTranspose1d(a, a, 4, 2, 1),
            ]))
        self.final = nn.Sequential(Conv1dBlock(dims[1], dims[1], k, g), nn.Conv1d(dims[1], action_dim, 1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([self.step_encoder(timesteps), global_cond], -1)  # (B, dsed + D)
        x = x.transpose(1, 2)  # (B, A, T)
        skips = []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)  # (B, C, T / 2) except at the last level
        for block in self.mid:
            x = block(x, cond)
        for block1, block2, upsample in self.up:
            x = torch.cat([x, skips.pop()], 1)  # (B, 2C, T')
            x = upsample(block2(block1(x, cond), cond))
        return self.final(x).transpose(1, 2)  # (B, T, A)


# ----------------------------------------------------------------------------- schedulers


def make_schedulers(cfg: DiffusionPolicyConfig):
    """(training DDPM scheduler, acting scheduler), built from config values (no hub download).

    diffusers is imported here, so only building a policy pays for it.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, clip_sample=True)
    train = DDPMScheduler(variance_type="fixed_small", **common)
    if cfg.sampler == "ddim":
        act = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
    else:
        act = DDPMScheduler(variance_type="fixed_small", **common)
    return train, act


# ----------------------------------------------------------------------------- the model


class DiffusionModel(nn.Module):
    """Normaliser + image encoder + U-Net denoiser. `forward(batch)` = loss, `sample(...)` = action chunks.

    Batches (raw, un-normalised values; the model normalises):
    - `images`: uint8 (B, n_obs_steps, H, W, 3)
    - `proprio`: float (B, n_obs_steps, proprio_dim)
    - `actions`: float (B, horizon, action_dim) (training only)
    - optional, for exactly reproducible training: `crop` int (B, 2) top-left crop corners,
      `noise` (B, horizon, action_dim), `timesteps` int (B,); drawn from torch's RNG when absent.
    """

    def __init__(self, cfg: DiffusionPolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.normalizer = Normalizer(cfg.proprio_dim, cfg.action_dim)
        self.encoder = ImageEncoder(cfg)
        cond_dim = cfg.n_obs_steps * (cfg.image_feature_dim + cfg.proprio_dim)
        self.unet = ConditionalUnet1d(cfg.action_dim, cond_dim, cfg)
        self.train_scheduler, self.act_scheduler = make_schedulers(cfg)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_obs(self, images: torch.Tensor, proprio: torch.Tensor, crop: torch.Tensor | None) -> torch.Tensor:
        """-> global condition (B, n_obs_steps * (image_feature_dim + proprio_dim))."""
        b, t = images.shape[:2]
        if images.shape[2:] != (self.cfg.image_size, self.cfg.image_size, 3):
            raise ValueError(f"images must be (B, T, {self.cfg.image_size}, {self.cfg.image_size}, 3) "
                             f"(config image_size). Got {tuple(images.shape)}")
        images = crop_images(images, self.cfg.crop_size, crop)  # (B, T, c, c, 3)
        feats = self.encoder(images.flatten(0, 1)).view(b, t, -1)  # (B, T, F)
        prop = self.normalizer.proprio.normalize(proprio.float())  # (B, T, P)
        return torch.cat([feats, prop], -1).flatten(1)  # (B, T * (F + P))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """DDPM loss: MSE between the U-Net's prediction and the noise (or the clean chunk)."""
        images, actions = batch["images"], batch["actions"]
        b = actions.shape[0]
        crop = batch.get("crop")
        if crop is None and self.cfg.crop_size < self.cfg.image_size:
            crop = torch.randint(0, self.cfg.image_size - self.cfg.crop_size + 1, (b, 2))
        cond = self.encode_obs(images, batch["proprio"], crop)  # (B, D)
        clean = self.normalizer.action.normalize(actions.float())  # (B, horizon, A) in ~[-1, 1]
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn(clean.shape).to(clean.device)
        timesteps = batch.get("timesteps")
        if timesteps is None:
            timesteps = torch.randint(0, self.cfg.num_train_timesteps, (b,)).to(clean.device)
        noisy = self.train_scheduler.add_noise(clean, noise, timesteps)
        pred = self.unet(noisy, timesteps, cond)  # (B, horizon, A)
        target = noise if self.cfg.prediction_type == "epsilon" else clean
        return F.mse_loss(pred.float(), target)

    @torch.no_grad()
    def sample(self, images: torch.Tensor, proprio: torch.Tensor, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None) -> torch.Tensor:
        """Observation windows -> un-normalised action chunks (B, horizon, action_dim), clipped to [-1, 1].

        The initial noise (and DDPM's per-step noise) come from `generator`: same generator state and
        observations, same actions.
        """
        cond = self.encode_obs(images, proprio, None)  # (B, D), centre crop
        b, device = cond.shape[0], cond.device
        x = torch.randn((b, self.cfg.horizon, self.cfg.action_dim), generator=generator,
                        device=generator.device if generator is not None else device).to(device)
        scheduler = self.act_scheduler
        scheduler.set_timesteps(num_inference_steps or self.cfg.num_inference_steps)
        for t in scheduler.timesteps:
            pred = self.unet(x, t.expand(b).to(device), cond)
            x = scheduler.step(pred, t, x, generator=generator).prev_sample
        return self.normalizer.action.unnormalize(x).clamp(-1.0, 1.0)
