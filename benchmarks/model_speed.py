"""Generation speed of the two HMA variants at each size preset (the paper's Table 1).

For every (variant, preset): a randomly initialised model of the shipped Lift layout (16x16 tokens,
2x2 patches, 4 action tokens, Panda's 7-D actions and 9-D proprio) is prompted with 4 frames, then
generates frames one by one as the learned env does (MaskGIT / MAR unmasking with M iterations, then the
cache append of the new frame). Frames per second at batch 1 (one env) and, with --batch, per frame of a
batch. Speed does not depend on the weights, so no training is needed; parameters are counted.

    python -m benchmarks.model_speed                      # CPU, every preset
    python -m benchmarks.model_speed --device cuda        # on a GPU (writes model_speed_cuda.json)
    python -m benchmarks.model_speed --shipped --threads 2 --batch 1 16   # the shipped checkpoints

--shipped times the shipped Lift checkpoints' dynamics models instead (`--variants`: any of the shipped
variants, each with its own default decoding: the MaskGIT ones sample, the MAR one runs noise-free DDIM), in
alternating blocks so that all see the same machine load (`model_speed_shipped.json`; `--result` names
another file), with each variant's time per frame relative to the default MaskGIT checkpoint's.

Writes `benchmarks/results/model_speed.json`: rows [{variant, preset, params_m, frames_per_s, device, ...}].
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_result
from hma_gym.envs.learned_env import VARIANTS as SHIPPED
from hma_gym.models.hma import HMA_PRESETS, EmbodimentSpec, make_hma

VARIANTS = ("maskgit", "mar")


def build(variant: str, preset: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"head": "mar", "latent_dim": 4} if variant == "mar" else {}
    model = make_hma(preset, vocab_size=1000, grid=16, patch_size=2, n_action_tokens=4, max_frames=12,
                     embodiments={"panda": EmbodimentSpec(action_dim=7, state_dim=9)}, **extra)
    with torch.no_grad():  # adaLN-Zero blocks start as the identity; make every layer do its work
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(device).eval()


@torch.no_grad()
def frames_per_second(model, batch: int, frames: int, steps: int, diffusion_steps: int | None, device: str,
                      min_seconds: float, greedy: bool = False) -> tuple[float, int]:
    """Generated frames per second (every row counts) after a 4-frame prompt; at least `frames` frames and
    `min_seconds` of timing."""
    cfg = model.config
    ids = torch.zeros(batch, dtype=torch.long, device=device)
    state = torch.zeros(batch, 9, device=device)
    action = torch.zeros(batch, 7, device=device)
    shape = (batch, 16, 16, 4) if cfg.continuous else (batch, 16, 16)
    prompt = torch.zeros(shape, device=device, dtype=torch.float32 if cfg.continuous else torch.long)
    cache = model.new_cache(batch)
    gen = torch.Generator(device=device).manual_seed(0)
    for t in range(4):
        model.append_frame(cache, prompt, state, None if t == 0 else action, ids, return_hidden=False)

    def one() -> None:
        kw = {"diffusion_steps": diffusion_steps} if cfg.continuous else {}
        tokens, s = model.generate_frame(cache, action, ids, steps=steps, generator=gen, greedy=greedy, **kw)
        model.append_frame(cache, tokens, s, action, ids, return_hidden=False)

    one()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < frames or time.perf_counter() - t0 < min_seconds:
        one()
        n += 1
        if n >= 10 * frames:
            break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0), n


def shipped_rows(args) -> tuple[list[dict], dict]:
    """The shipped checkpoints' dynamics models, each at its checkpoint's decoding, timed in alternating blocks."""
    from hma_gym.checkpoint import load_json
    from hma_gym.envs.learned_env import default_checkpoint
    from hma_gym.world_model import load_dynamics

    models = {}
    for variant in args.variants:
        path = default_checkpoint(variant)
        greedy = bool(load_json(path / "config.json").get("generation", {}).get("greedy", False))
        models[variant] = (load_dynamics(path)[0].to(args.device), greedy, str(path))
    rows = []
    for batch in args.batch:
        fps: dict[str, list[float]] = {v: [] for v in models}
        for _ in range(args.blocks):
            for variant, (model, greedy, _) in models.items():
                f, _ = frames_per_second(model, batch, args.frames, args.steps, args.diffusion_steps or None,
                                         args.device, args.min_seconds, greedy=greedy)
                fps[variant].append(f)
        for variant, (model, greedy, path) in models.items():
            mean = sum(fps[variant]) / len(fps[variant])
            rows.append({"variant": variant, "preset": "shipped", "checkpoint": path, "greedy": greedy,
                         "params_m": round(model.num_params() / 1e6, 2), "frames_per_s": mean,
                         "ms_per_frame": 1000.0 / mean, "block_frames_per_s": fps[variant], "device": args.device,
                         "batch": batch, "unmasking_steps": args.steps})
            print(f"{variant:8s} shipped batch {batch:3d} {mean:8.2f} frames/s (blocks {fps[variant]})", flush=True)
    by = {(r["variant"], r["batch"]): r["frames_per_s"] for r in rows}
    # time per frame relative to the default MaskGIT checkpoint's, per variant and batch
    ratios = {v: {f"batch_{b}": by[("maskgit", b)] / by[(v, b)] for b in args.batch}
              for v in models if v != "maskgit"} if "maskgit" in models else {}
    return rows, ratios


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=list(HMA_PRESETS), choices=list(HMA_PRESETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(SHIPPED),
                   help="heads to time at each preset (maskgit, mar); with --shipped, any shipped variant")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="rows generated together (envs of a vector env); several with --shipped")
    p.add_argument("--shipped", action="store_true", help="time the shipped checkpoints instead of the presets")
    p.add_argument("--blocks", type=int, default=3, help="--shipped: alternating timing blocks per model")
    p.add_argument("--frames", type=int, default=3, help="timed frames at least (after one warm-up frame)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds at least")
    p.add_argument("--steps", type=int, default=2, help="unmasking iterations M (both variants)")
    p.add_argument("--diffusion-steps", type=int, default=0, help="mar: DDIM steps per token (0 = config default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--result", default="", help="result name (default model_speed, model_speed_cuda on a GPU)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    torch.set_num_threads(args.threads)
    if args.shipped:
        rows, ratios = shipped_rows(args)
        payload = {"rows": rows, "threads": args.threads, "time_per_frame_vs_maskgit": ratios}
        if "mar" in ratios:
            payload["mar_time_per_frame_vs_maskgit"] = ratios["mar"]
        write_result(args.result or "model_speed_shipped", payload, module="model_speed")
        return payload
    if len(args.batch) > 1:
        p.error("one --batch for the presets (several only with --shipped)")
    if set(args.variants) - set(VARIANTS):
        p.error(f"the presets are timed for the heads {VARIANTS}; shipped variants ({sorted(SHIPPED)}) need --shipped")
    args.batch = args.batch[0]
    rows = []
    for preset in args.presets:
        for variant in args.variants:
            model = build(variant, preset, args.device)
            fps, n = frames_per_second(model, args.batch, args.frames, args.steps, args.diffusion_steps or None,
                                       args.device, args.min_seconds)
            row = {"variant": variant, "preset": preset, "params_m": round(model.num_params() / 1e6, 2),
                   "frames_per_s": fps, "ms_per_frame": 1000.0 / fps, "device": args.device,
                   "batch": args.batch, "unmasking_steps": args.steps, "timed_frames": n * args.batch}
            if variant == "mar":
                row["diffusion_steps"] = args.diffusion_steps or model.config.diff_sample_steps
                row["diffusion_head_params_m"] = round(sum(q.numel() for q in model.image.net.parameters()) / 1e6, 2)
            rows.append(row)
            print(f"{variant:8s} {preset:6s} {row['params_m']:8.2f} M params  {fps:8.2f} frames/s", flush=True)
            del model
    by = {(r["variant"], r["preset"]): r["frames_per_s"] for r in rows}
    ratios = {preset: by[("maskgit", preset)] / by[("mar", preset)] for preset in args.presets
              if ("maskgit", preset) in by and ("mar", preset) in by}
    name = args.result or ("model_speed_cuda" if args.device.startswith("cuda") else "model_speed")
    payload = {"rows": rows, "mar_time_per_frame_vs_maskgit": ratios, "threads": args.threads}
    write_result(name, payload, module="model_speed")
    return payload


if __name__ == "__main__":
    main()
