"""`hma-gym eval-model`: open-loop fidelity, controllability and success agreement of a world model.

Protocol (every fidelity figure of the project): 4 ground-truth prompt frames, then 8 frames that the
model generates from its own previous outputs given the episode's true actions, compared with the
ground-truth frames of held-out (`mask/valid`) episodes. Reported beside the copy-the-last-prompt-frame
baseline and the tokenizer's own reconstruction ceiling.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hma_gym.metrics import binary_metrics, psnr, ssim
from hma_gym.world_model import WorldModel
from training.data import DataConfig, Episode, load_episodes, token_tensor


def eval_windows(episodes: list[Episode], T: int, stride: int) -> list[tuple[int, int]]:
    """Deterministic (episode, start) windows of T frames every `stride` frames of each episode."""
    return [(i, s) for i, e in enumerate(episodes) for s in range(0, len(e) - T + 1, stride)]


def tokenize_episodes(encoder: WorldModel | torch.nn.Module, episodes: list[Episode], batch: int = 256) -> None:
    """Fill `episode.tokens` with tokenizer codes (int16), or continuous latents (float16) for a mar world
    model; `encoder` is a world model or a tokenizer."""
    device = next(encoder.parameters()).device
    for e in episodes:
        if e.tokens is not None:
            continue
        out = [encoder.encode(torch.from_numpy(e.frames[i : i + batch]).to(device)).cpu()
               for i in range(0, len(e), batch)]
        out = torch.cat(out)
        e.tokens = out.numpy().astype(np.float16 if out.is_floating_point() else np.int16)


@torch.no_grad()
def open_loop(
    wm: WorldModel,
    episodes: list[Episode],
    windows: list[tuple[int, int]],
    n_prompt: int = 4,
    n_gen: int = 8,
    actions: np.ndarray | None = None,
    steps: int = 2,
    temperature: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    diffusion_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Prompt with `n_prompt` GT frames, generate `n_gen` frames; returns generated and GT arrays.

    `actions` (len(windows), n_prompt + n_gen - 1, A) replaces the episodes' actions (e.g. random
    actions for dPSNR); by default the true actions are used. Returns uint8 `pred` and `gt` frames
    (N, n_gen, H, W, 3), raw `pred_states`/`gt_states` (N, n_gen, S), `gt_success` (N, n_gen) and
    `prompt_last` (N, H, W, 3), the last prompt frame (the copy baseline).
    """
    T = n_prompt + n_gen
    gen = torch.Generator(device=wm.device).manual_seed(seed)
    out: dict[str, list] = {k: [] for k in ("pred", "gt", "pred_states", "gt_states", "gt_success", "prompt_last")}
    for b0 in range(0, len(windows), batch_size):
        chunk = windows[b0 : b0 + batch_size]
        eps = [(episodes[i], s) for i, s in chunk]
        tok = token_tensor(np.stack([e.tokens[s : s + T] for e, s in eps]))
        st = torch.from_numpy(np.stack([e.states[s : s + T] for e, s in eps]))
        if actions is None:
            act = torch.from_numpy(np.stack([e.actions[s : s + T - 1] for e, s in eps]))
        else:
            act = torch.from_numpy(actions[b0 : b0 + len(chunk)]).float()
        cache = wm.new_cache(len(chunk))
        for t in range(n_prompt):
            wm.observe(cache, tok[:, t], st[:, t], None if t == 0 else act[:, t - 1])
        pred_tok, pred_st = [], []
        for j in range(n_gen):
            a = act[:, n_prompt - 1 + j]
            tokens, states = wm.generate(cache, a, steps=steps, temperature=temperature, generator=gen,
                                         greedy=greedy, diffusion_steps=diffusion_steps)
            wm.observe(cache, tokens, states, a)
            pred_tok.append(tokens)
            pred_st.append(states.cpu())
        frames = wm.decode(torch.stack(pred_tok, 1).flatten(0, 1)).cpu().numpy()
        out["pred"].append(frames.reshape(len(chunk), n_gen, *frames.shape[1:]))
        out["pred_states"].append(torch.stack(pred_st, 1).numpy())
        out["gt"].append(np.stack([e.frames[s + n_prompt : s + T] for e, s in eps]))
        out["gt_states"].append(np.stack([e.states[s + n_prompt : s + T] for e, s in eps]))
        out["gt_success"].append(np.stack([e.success[s + n_prompt : s + T] for e, s in eps]))
        out["prompt_last"].append(np.stack([e.frames[s + n_prompt - 1] for e, s in eps]))
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.no_grad()
def first_step_perplexity(wm: WorldModel, episodes: list[Episode], windows: list[tuple[int, int]],
                          n_prompt: int = 4, batch_size: int = 16) -> float:
    """exp(cross-entropy) of the fully masked next frame given GT history (MaskGIT's first iteration)."""
    ce, count = 0.0, 0
    model = wm.dynamics
    for b0 in range(0, len(windows), batch_size):
        eps = [(episodes[i], s) for i, s in windows[b0 : b0 + batch_size]]
        tok = token_tensor(np.stack([e.tokens[s : s + n_prompt + 1] for e, s in eps]))
        st = torch.from_numpy(np.stack([e.states[s : s + n_prompt] for e, s in eps]))
        act = torch.from_numpy(np.stack([e.actions[s : s + n_prompt] for e, s in eps]))
        cache = wm.new_cache(len(eps))
        for t in range(n_prompt):
            wm.observe(cache, tok[:, t], st[:, t], None if t == 0 else act[:, t - 1])
        target = tok[:, n_prompt].to(wm.device)
        mask = torch.ones_like(target, dtype=torch.bool)
        logits, _ = model.predict_frame(cache, target, mask, wm._norm_action(act[:, n_prompt - 1]),
                                        wm._ids(len(eps)))
        ce += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum").item()
        count += target.numel()
    return float(np.exp(ce / max(count, 1)))


def fidelity_report(wm: WorldModel, episodes: list[Episode], windows: list[tuple[int, int]], *,
                    steps: int = 2, temperature: float = 1.0, greedy: bool = False, n_random: int = 5,
                    seed: int = 0, batch_size: int = 16, progress: bool = False,
                    diffusion_steps: int | None = None, n_prompt: int = 4) -> dict:
    """PSNR/SSIM per generated frame, copy baseline, tokenizer ceiling, dPSNR, perplexity, proprio error.

    `windows` are 12-frame windows whose last 8 frames are generated; `n_prompt` (1-4) GT frames just before
    them are the prompt (4: the protocol; 1: as an env episode starts, from one frame), so every setting
    scores the same generated frames against the same copy baseline.
    """
    if not 1 <= n_prompt <= 4:
        raise ValueError(f"n_prompt must be in 1..4 (the 4 prompt frames of a 12-frame window). Got {n_prompt=}")
    kw = dict(steps=steps, temperature=temperature, greedy=greedy, batch_size=batch_size,
              diffusion_steps=diffusion_steps)
    windows = [(i, st + 4 - n_prompt) for i, st in windows]  # the same 8 generated frames
    t0 = time.perf_counter()
    res = open_loop(wm, episodes, windows, n_prompt=n_prompt, seed=seed, **kw)
    seconds = time.perf_counter() - t0
    n, n_gen = res["pred"].shape[:2]
    p = psnr(res["pred"], res["gt"]).reshape(n, n_gen)
    s = ssim(res["pred"], res["gt"]).reshape(n, n_gen)
    copy = psnr(np.repeat(res["prompt_last"][:, None], n_gen, 1), res["gt"]).reshape(n, n_gen)
    recon = wm.decode(token_tensor(np.stack(
        [episodes[i].tokens[st + n_prompt : st + n_prompt + 8] for i, st in windows])).flatten(0, 1)).cpu().numpy()
    ceiling = psnr(recon, res["gt"].reshape(-1, *res["gt"].shape[2:])).reshape(n, n_gen)
    # controllability: last-frame PSNR with the true actions minus the mean over random action sequences
    rng = np.random.default_rng(seed)
    last_random = []
    for k in tqdm(range(n_random), desc="dPSNR", disable=not progress):
        rand_actions = rng.uniform(-1, 1, (n, n_prompt + n_gen - 1, wm.action_dim)).astype(np.float32)
        r = open_loop(wm, episodes, windows, n_prompt=n_prompt, actions=rand_actions, seed=seed + 1 + k, **kw)
        last_random.append(psnr(r["pred"][:, -1], res["gt"][:, -1]))
    delta = p[:, -1] - np.mean(last_random, axis=0)
    state_err = np.abs(res["pred_states"] - res["gt_states"])
    report = {
        "windows": n,
        "psnr": float(p.mean()),
        "psnr_per_frame": p.mean(0).tolist(),
        "ssim": float(s.mean()),
        "copy_last_prompt_psnr": float(copy.mean()),
        "copy_last_prompt_psnr_per_frame": copy.mean(0).tolist(),
        "tokenizer_ceiling_psnr": float(ceiling.mean()),
        "delta_psnr": float(delta.mean()),
        "last_frame_psnr": float(p[:, -1].mean()),
        "last_frame_psnr_random_actions": float(np.mean(last_random)),
        "perplexity": None if wm.continuous else first_step_perplexity(wm, episodes, windows, n_prompt,
                                                                             batch_size=batch_size),
        "eef_pos_mae_m": float(state_err[..., :3].mean()),
        "state_mae": float(state_err.mean()),
        "generation_s_per_frame": seconds / (n * n_gen),
    }
    if wm.detector is not None:
        prob = wm.success_prob(torch.from_numpy(res["pred"].reshape(-1, *res["pred"].shape[2:])),
                               torch.from_numpy(res["pred_states"].reshape(-1, res["pred_states"].shape[-1])))
        pred = (prob.cpu().numpy() >= wm.threshold)
        report["success_agreement_generated"] = binary_metrics(pred, res["gt_success"].reshape(-1))
    return report


@torch.no_grad()
def free_run_report(wm: WorldModel, episodes: list[Episode], horizon: int = 100, n_episodes: int = 8,
                    steps: int = 2, temperature: float = 1.0, seed: int = 0, greedy: bool = False,
                    diffusion_steps: int | None = None) -> dict:
    """Stability of long rollouts: from each episode's first frame, replay its actions (then hold still,
    zero motion with the last gripper command) for `horizon` frames in one batch.

    Collapse to noise shows as exploding pixel contrast, a frozen sim as no change while the arm moves;
    reported per 10-frame bucket: PSNR against the GT frames where the episode still has them, the
    image contrast (pixel std) relative to the GT first frame, and the mean per-frame pixel change.
    """
    eps = episodes[:n_episodes]
    B = len(eps)
    actions = np.zeros((B, horizon, wm.action_dim), np.float32)
    for b, e in enumerate(eps):
        n = min(horizon, len(e.actions))
        actions[b, :n] = e.actions[:n]
        actions[b, n:, -1] = e.actions[n - 1, -1]
    gen = torch.Generator(device=wm.device).manual_seed(seed)
    cache = wm.new_cache(B)
    first = token_tensor(np.stack([e.tokens[0] for e in eps]))
    wm.observe(cache, first, torch.from_numpy(np.stack([e.states[0] for e in eps])))
    frames = [np.stack([e.frames[0] for e in eps])]
    for t in range(horizon):
        a = torch.from_numpy(actions[:, t])
        tokens, states = wm.generate(cache, a, steps=steps, temperature=temperature, generator=gen, greedy=greedy,
                                     diffusion_steps=diffusion_steps)
        wm.observe(cache, tokens, states, a)
        frames.append(wm.decode(tokens).cpu().numpy())
    frames = np.stack(frames, 1)  # (B, horizon + 1, H, W, 3)
    base_std = frames[:, 0].astype(np.float32).std()
    buckets = []
    for start in range(1, horizon + 1, 10):
        sl = slice(start, min(start + 10, horizon + 1))
        chunk = frames[:, sl].astype(np.float32)
        gt_p = [psnr(frames[b, t], eps[b].frames[t]).item() for b in range(B)
                for t in range(sl.start, sl.stop) if t < len(eps[b].frames)]
        change = np.abs(np.diff(frames[:, sl.start - 1 : sl.stop].astype(np.float32), axis=1)).mean()
        buckets.append({"frames": [sl.start, sl.stop - 1], "psnr_vs_gt": float(np.mean(gt_p)) if gt_p else None,
                        "contrast_ratio": float(chunk.std() / base_std), "mean_abs_change": float(change)})
    return {"episodes": B, "horizon": horizon, "buckets": buckets}


@dataclass
class EvalModelConfig(DataConfig):
    """Evaluate a packed checkpoint on the held-out episodes of a robomimic file."""

    checkpoint: str = ""
    """Packed checkpoint directory (empty: the shipped Lift checkpoint)."""
    out: str = "outputs/eval_model.json"
    """JSON report path."""
    stride: int = 8
    """A 12-frame window every n frames of each held-out episode."""
    steps: int = 2
    """MaskGIT unmasking steps per frame."""
    temperature: float = 1.0
    """Sampling temperature."""
    greedy: bool = False
    """Argmax decoding instead of sampling (mar: noise-free DDIM)."""
    diffusion_steps: int = 0
    """mar: DDIM steps per token (0: the model's `diff_sample_steps`)."""
    prompt_frames: int = 4
    """GT prompt frames before the 8 generated ones (1-4; 4: the protocol, 1: from one frame, as an env
    episode starts). The generated frames and the copy baseline are the same for every value."""
    random_actions: int = 5
    """Random action sequences for dPSNR."""
    seed: int = 0
    """Sampling seed."""
    device: str = "cpu"
    """cpu or cuda."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        super().__post_init__()
        if self.diffusion_steps < 0:
            raise ValueError(f"diffusion_steps must be >= 0 (0: the model's). Got {self.diffusion_steps}")
        if not 1 <= self.prompt_frames <= 4:
            raise ValueError(f"prompt_frames must be in 1..4. Got {self.prompt_frames}")


def eval_model(cfg: EvalModelConfig) -> dict:
    from hma_gym.envs.learned_env import default_checkpoint

    checkpoint = cfg.checkpoint or str(default_checkpoint())
    wm = WorldModel.from_checkpoint(checkpoint, device=cfg.device)
    data = DataConfig(**{k: getattr(cfg, k) for k in DataConfig.__dataclass_fields__})
    data.image_size = wm.image_size
    episodes = load_episodes(data, "valid", progress=cfg.progress)
    tokenize_episodes(wm, episodes)
    windows = eval_windows(episodes, 12, cfg.stride)
    gen = dict(steps=cfg.steps, temperature=cfg.temperature, greedy=cfg.greedy, seed=cfg.seed,
               diffusion_steps=cfg.diffusion_steps or None)
    report = fidelity_report(wm, episodes, windows, n_random=cfg.random_actions, progress=cfg.progress,
                             n_prompt=cfg.prompt_frames, **gen)
    report["free_run"] = free_run_report(wm, episodes, **gen)
    report = {"checkpoint": checkpoint, "data": cfg.data, "split": "valid", "config": asdict(cfg), **report}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("per_frame") and k != "free_run"}, indent=2))
    return report
