"""Fidelity and classification metrics (no pretrained networks: LPIPS/FID/FVD are not computed here)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_float(images) -> torch.Tensor:
    """uint8 (..., H, W, 3) arrays/tensors -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR in dB between uint8 (..., H, W, 3) image batches (peak 1.0 after /255)."""
    x, y = _as_float(a), _as_float(b)
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).numpy()


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004: Gaussian window, K1=0.01, K2=0.03), mean over channels."""
    x, y = _as_float(a), _as_float(b)
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).numpy()


def binary_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, recall and precision of the positive class."""
    pred, label = np.asarray(pred, bool), np.asarray(label, bool)
    tp = float((pred & label).sum())
    tn = float((~pred & ~label).sum())
    fp = float((pred & ~label).sum())
    fn = float((~pred & label).sum())
    recall = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return {
        "accuracy": (tp + tn) / max(1.0, tp + tn + fp + fn),
        "balanced_accuracy": float(np.nanmean([recall, specificity])),
        "recall": recall,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "positives": tp + fn,
        "negatives": tn + fp,
    }


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    from scipy.stats import rankdata

    return pearson(rankdata(x), rankdata(y))


def mmrv(real, sim) -> float:
    """Mean Maximum Rank Violation (SIMPLER, Li et al. 2024).

    For each policy i, the largest real-performance gap |real_i - real_j| over the policies j whose
    order the simulator gets wrong ((sim_i < sim_j) != (real_i < real_j)); averaged over i. 0 when the
    simulator ranks every pair as reality does.
    """
    real, sim = np.asarray(real, float), np.asarray(sim, float)
    n = len(real)
    if n == 0 or len(sim) != n:
        raise ValueError(f"mmrv needs two equally long non-empty lists. Got {len(real)} and {len(sim)}")
    worst = np.zeros(n)
    for i in range(n):
        for j in range(n):
            if (sim[i] < sim[j]) != (real[i] < real[j]):
                worst[i] = max(worst[i], abs(real[i] - real[j]))
    return float(worst.mean())
