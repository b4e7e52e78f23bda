"""Env speed, side by side in one run: the GT env (camera at several sizes, and without it) and the learned
env (single; natively batched vector env at N = 1, 4, 16; with and without the key/value cache), FLOPs per
generated frame and the achieved FLOP/s against a matmul peak measured in the same run.

    python -m benchmarks.env_speed [--steps 200] [--checkpoint DIR] [--skip-learned]
    python -m benchmarks.env_speed --device cuda --skip-gt     # learned rows on a GPU
    python -m benchmarks.env_speed --model-sizes 128x3 96x3    # also other (untrained) model sizes
    python -m benchmarks.env_speed --no-compile                 # without the compile=True rows
    python -m benchmarks.env_speed --variants maskgit fast      # shipped variants against GT, interleaved
    python -m benchmarks.env_speed --variants fast fast+compile # ... also with compile=True

Writes benchmarks/results/env_speed.json (env_speed_<device>.json for a --device other than cpu;
`_threads<n>` added with --threads n).
Ratios between rows are the meaningful numbers on a shared, noisy machine; absolute numbers move with
its load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import hma_gym  # noqa: F401
from benchmarks.common import learned_env_kwargs, write_result


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(env, steps: int, seed: int = 0, vector: bool = False) -> float:
    """Env steps per second over `steps` random-action steps (resets excluded; N steps per vector step).

    A step returns numpy arrays, so it has finished on the device when it returns."""
    rng = np.random.default_rng(seed)
    n = env.num_envs if vector else 1
    shape = (n, 7) if vector else (7,)
    env.reset(seed=seed)
    for _ in range(3):  # warm-up
        env.step(rng.uniform(-1, 1, shape).astype(np.float32))
    elapsed, done = 0.0, 0
    while done < steps:
        action = rng.uniform(-1, 1, shape).astype(np.float32)
        t0 = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        elapsed += time.perf_counter() - t0
        done += 1
        if not vector and (terminated or truncated):
            env.reset()
    return done * n / elapsed


def matmul_peak(size: int = 1024, repeats: int = 20, device: str = "cpu") -> float:
    """fp32 GFLOP/s of a square matmul on `device` (CPU: torch's current thread count), best of `repeats`."""
    if device != "cpu":
        size = 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def gt_rows(steps: int) -> list[dict]:
    configs = [
        ("gt-no-camera", dict(use_camera=False)),
        ("gt-64px", dict(image_size=64)),
        ("gt-84px", dict(image_size=84)),
        ("gt-128px", dict(image_size=128)),
        ("gt-84px-robosuite-default-render", dict(image_size=84, fast_render=False)),
    ]
    rows = []
    for name, kwargs in configs:
        env = gym.make("RobomimicLift-v0", **kwargs)
        rows.append({"env": name, "kwargs": kwargs, "steps_per_s": time_steps(env, steps)})
        env.close()
    return rows


def trunk_time(wm, steps: int, cached: bool, repeats: int = 5) -> float:
    """Seconds of dynamics-model compute per generated frame, with or without the key/value cache.

    Cached (as the env runs it): the append of the previous frame and `steps` masked passes over one frame
    against the cache. Uncached (the
    official HMA code's cost model): every unmasking pass re-runs the trunk over all
    W = max_frames - 1 context frames plus the frame being generated.
    """
    model = wm.dynamics
    window = model.config.max_frames - 1
    g = model.config.grid
    dev = wm.device
    tokens = torch.randint(0, model.config.vocab_size, (1, g, g), device=dev)
    states = torch.zeros(1, wm.state_dim, device=dev)
    action = torch.zeros(1, wm.action_dim, device=dev)
    ids = wm._ids(1)
    full = model.new_cache(1)
    for _ in range(window):
        model.append_frame(full, tokens, states, action, ids)
    best = float("inf")
    for _ in range(repeats):
        sync(str(dev))
        t0 = time.perf_counter()
        if cached:
            model.append_frame(full, tokens, states, action, ids, return_hidden=False)
            model.generate_frame(full, action, ids, steps=steps)
        else:
            for _ in range(steps):
                cache = model.new_cache(1)
                for _ in range(window):
                    model.append_frame(cache, tokens, states, action, ids)
                model.predict_frame(cache, tokens, torch.ones(1, g, g, dtype=torch.bool, device=dev), action, ids)
        sync(str(dev))
        best = min(best, time.perf_counter() - t0)
    return best


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def flatness(env, steps: int, block: int = 100) -> dict:
    """Time per step and resident memory over a long episode-free run (no resets): both should stay flat."""
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    times, rss = [], []
    for _ in range(0, steps, block):
        t0 = time.perf_counter()
        for _ in range(block):
            env.step(rng.uniform(-1, 1, 7).astype(np.float32))
        times.append(1000 * (time.perf_counter() - t0) / block)
        rss.append(rss_mb())
    return {"steps": steps, "block": block, "ms_per_step_first_block": times[0], "ms_per_step_last_block": times[-1],
            "ms_per_step_by_block": times, "rss_mb_first_block": rss[0], "rss_mb_last_block": rss[-1]}


def learned_rows(steps: int, checkpoint: str | None, long_steps: int, device: str = "cpu",
                 sizes: tuple[int, ...] = (1, 4, 16)) -> tuple[list[dict], dict]:
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    kwargs["device"] = device
    rows = []
    single = gym.make("HMA-RobomimicLift-v0", **kwargs)
    rows.append({"env": "learned-single", "steps_per_s": time_steps(single, steps)})
    sim = single.unwrapped.sim
    # FLOPs of one generated frame (generation + history append + decode + success detector)
    single.reset(seed=0)
    counter = FlopCounterMode(display=False)
    with counter:
        single.step(np.zeros(7, np.float32))
    flops = counter.get_total_flops()
    t_step = 1.0 / rows[0]["steps_per_s"]
    t_cached, t_uncached = trunk_time(sim.wm, sim.steps, True), trunk_time(sim.wm, sim.steps, False)
    # the same env step with the trunk's cached cost replaced by its uncached cost
    rows.append({"env": "learned-single-no-kv-cache", "steps_per_s": 1.0 / (t_step - t_cached + t_uncached)})
    for n in sizes:
        vec = gym.make_vec("HMA-RobomimicLift-v0", num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
        rows.append({"env": f"learned-vector-N{n}", "num_envs": n,
                     "steps_per_s": time_steps(vec, max(20, steps // n), vector=True)})
        vec.close()
    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "checkpoint": str(sim.checkpoint),
        "params_dynamics_m": sim.wm.dynamics.num_params() / 1e6,
        "unmasking_steps": sim.steps,
        "flops_per_frame_g": flops / 1e9,
        "achieved_gflops_single": flops / t_step / 1e9,
        "trunk_ms_per_frame_cached": 1000 * t_cached,
        "trunk_ms_per_frame_uncached": 1000 * t_uncached,
    }
    if long_steps:
        info["flatness"] = flatness(single.unwrapped, long_steps)
    single.close()
    return rows, info


def compiled_rows(steps: int, checkpoint: str | None, device: str, sizes: tuple[int, ...] = (16,),
                  blocks: int = 6) -> list[dict]:
    """The single env and vector envs of `sizes` with ``compile=True`` (torch.compile'd trunk, decoder and
    detector), each timed against an eager twin in alternating blocks of steps, so that the speed-up is
    measured side by side on this noisy machine. `compile_s`: the first step after reset, which compiles;
    `steps_per_s`: the compiled env's median block."""
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    kwargs["device"] = device
    rows = []
    for n in (None, *sizes):
        if n is None:
            pair = [gym.make("HMA-RobomimicLift-v0", **kwargs, compile=c) for c in (False, True)]
            name, shape, per_step = "learned-single-compiled", (7,), 1
        else:
            pair = [gym.make_vec("HMA-RobomimicLift-v0", num_envs=n, vectorization_mode="vector_entry_point",
                                 **kwargs, compile=c) for c in (False, True)]
            name, shape, per_step = f"learned-vector-N{n}-compiled", (n, 7), n
        rng = np.random.default_rng(0)
        for env in pair:
            env.reset(seed=0)
        t0 = time.perf_counter()
        pair[1].step(np.zeros(shape, np.float32))
        compile_s = time.perf_counter() - t0
        pair[0].step(np.zeros(shape, np.float32))
        per_block = max(5, steps // per_step // blocks)
        rates: list[list[float]] = [[], []]
        for _ in range(blocks):
            for env, rate in zip(pair, rates, strict=True):
                t0 = time.perf_counter()
                for _ in range(per_block):
                    _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, shape).astype(np.float32))
                    if n is None and (terminated or truncated):
                        env.reset()
                rate.append(per_block * per_step / (time.perf_counter() - t0))
        eager, compiled = (float(np.median(r)) for r in rates)
        rows.append({"env": name, **({"num_envs": n} if n else {}), "compile_s": compile_s, "steps_per_s": compiled,
                     "eager_steps_per_s_interleaved": eager, "speedup_vs_eager": compiled / eager})
        for env in pair:
            env.close()
    return rows


def resized_checkpoint(src: Path, dst: Path, d_model: int, n_layer: int, n_head: int) -> Path:
    """A copy of checkpoint `src` whose dynamics model has another width/depth, with random weights: the
    same tokenizer, detector, spaces and generation settings, for timing a model size not trained."""
    from hma_gym.checkpoint import load_json, save_json, save_tensors
    from hma_gym.models.hma import HMA, HMAConfig

    shutil.copytree(src, dst)
    config = load_json(dst / "config.json")
    config["dynamics"].update(d_model=d_model, n_layer=n_layer, n_head=n_head)
    model = HMA(HMAConfig.from_dict(config["dynamics"]))
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give it work to do
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_tensors(dst / "dynamics.safetensors", model.state_dict())
    save_json(dst / "config.json", config)
    return dst


def size_rows(steps: int, checkpoint: str | None, sizes: list[str], device: str) -> list[dict]:
    """learned-single and learned-vector-N16 steps/s for dynamics models of other sizes ("DxL" or "DxLxH")."""
    from hma_gym.envs.learned_env import default_checkpoint

    src = Path(checkpoint) if checkpoint else default_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in sizes:
            parts = [int(x) for x in spec.lower().split("x")]
            d, n_layer, n_head = (*parts, 4) if len(parts) == 2 else parts
            ckpt = resized_checkpoint(src, Path(tmp) / spec, d, n_layer, n_head)
            kwargs = {"checkpoint": str(ckpt), "device": device}
            single = gym.make("HMA-RobomimicLift-v0", **kwargs)
            params = single.unwrapped.sim.wm.dynamics.num_params() / 1e6
            rows.append({"env": f"learned-single-{spec}", "model": spec, "params_dynamics_m": params,
                         "random_weights": True, "steps_per_s": time_steps(single, steps)})
            single.close()
            vec = gym.make_vec("HMA-RobomimicLift-v0", num_envs=16, vectorization_mode="vector_entry_point",
                               **kwargs)
            rows.append({"env": f"learned-vector-N16-{spec}", "model": spec, "num_envs": 16,
                         "params_dynamics_m": params, "random_weights": True,
                         "steps_per_s": time_steps(vec, max(20, steps // 16), vector=True)})
            vec.close()
    return rows


def variant_kwargs(spec: str) -> dict:
    """A shipped variant name ("maskgit", "fast", ...) or a packed checkpoint directory, optionally with
    "+compile" (``compile=True``) -> gym.make kwargs."""
    name, plus, option = spec.partition("+")
    if plus and option != "compile":
        raise ValueError(f"{spec!r}: the only option is +compile")
    return {**learned_env_kwargs(name), **({"compile": True} if plus else {})}


def interleaved_rows(variants: list[str], steps: int, device: str, blocks: int = 5, n: int = 16) -> list[dict]:
    """The GT env (64 px) and, per variant, the learned single env and its N-env vector env, timed in
    alternating blocks (GT, then each learned env, `blocks` times), so each ratio compares envs timed within
    the same minute of this noisy machine. Ratios: per block to that block's GT rate, and their median.
    A "+compile" variant compiles during the warm-up steps before each timed block (graphs are kept)."""
    gt = gym.make("RobomimicLift-v0", image_size=64)
    envs = {}
    for spec in variants:
        kwargs = {**variant_kwargs(spec), "device": device}
        envs[(spec, 1)] = gym.make("HMA-RobomimicLift-v0", **kwargs)
        envs[(spec, n)] = gym.make_vec("HMA-RobomimicLift-v0", num_envs=n, vectorization_mode="vector_entry_point",
                                       **kwargs)
    per_block = max(20, steps // blocks)
    gt_rates, rates = [], {key: [] for key in envs}
    for b in range(blocks):
        gt_rates.append(time_steps(gt, per_block, seed=b))
        for (spec, size), env in envs.items():
            rates[(spec, size)].append(time_steps(env, per_block if size == 1 else max(5, per_block // size),
                                                  seed=b, vector=size > 1))
    rows = []
    for (spec, size), rate in rates.items():
        ratios = [r / g for r, g in zip(rate, gt_rates, strict=True)]
        env = envs[(spec, size)]
        sim = env.unwrapped.sim
        rows.append({"env": f"interleaved-{'single' if size == 1 else f'vector-N{size}'}[{spec}]",
                     "variant": spec, "num_envs": size, "checkpoint": str(sim.checkpoint),
                     "params_dynamics_m": sim.wm.dynamics.num_params() / 1e6,
                     "steps_per_s": float(np.median(rate)), "block_steps_per_s": rate,
                     "gt_block_steps_per_s": gt_rates, "block_ratio_to_gt": ratios,
                     "median_ratio_to_gt": float(np.median(ratios))})
        env.close()
    gt.close()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    parser.add_argument("--checkpoint", default=None, help="learned env checkpoint (default: the shipped one)")
    parser.add_argument("--skip-learned", action="store_true", help="GT rows only")
    parser.add_argument("--skip-gt", action="store_true", help="learned rows only (no ratios to the GT env)")
    parser.add_argument("--device", default="cpu", help="device of the learned env (cpu, cuda)")
    parser.add_argument("--vector-sizes", type=int, nargs="+", default=[1, 4, 16], help="vector env sizes N")
    parser.add_argument("--long-steps", type=int, default=2000,
                        help="steps of the flatness run (time and memory per step over one long episode; 0 = skip)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the learned env (default: torch's, one per core)")
    parser.add_argument("--model-sizes", nargs="*", default=[],
                        help="also time dynamics models of these sizes, DxL or DxLxH (random weights; speed only)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile=True rows (torch.compile; about a minute of compiling each)")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="also time these shipped variants (maskgit, fast, mar) or checkpoint directories, single "
                             "and N=16, in blocks alternating with the GT env (interleaved-* rows); NAME+compile "
                             "for compile=True")
    args = parser.parse_args(argv)
    if args.variants and args.skip_gt:
        parser.error("--variants times the learned envs against the GT env: leave out --skip-gt")
    for spec in args.variants:
        try:
            variant_kwargs(spec)
        except ValueError as e:
            parser.error(str(e))
    if args.skip_gt and args.skip_learned:
        parser.error("--skip-gt and --skip-learned leave nothing to measure")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak(device=args.device)
    rows = [] if args.skip_gt else gt_rows(args.steps)
    payload: dict = {"steps": args.steps, "matmul_peak_gflops": peak, "device": args.device}
    if not args.skip_learned:
        learned, info = learned_rows(args.steps, args.checkpoint, args.long_steps, args.device,
                                     tuple(args.vector_sizes))
        rows += learned
        if not args.no_compile:
            sizes = tuple(n for n in (16,) if n in args.vector_sizes)
            rows += compiled_rows(args.steps, args.checkpoint, args.device, sizes)
        if args.model_sizes:
            rows += size_rows(args.steps, args.checkpoint, args.model_sizes, args.device)
        if args.variants:
            rows += interleaved_rows(args.variants, args.steps, args.device)
        info["fraction_of_matmul_peak"] = info["achieved_gflops_single"] / peak
        payload["learned"] = info
    gt64 = next((r["steps_per_s"] for r in rows if r["env"] == "gt-64px"), None)
    for r in rows:
        r["ms_per_step"] = 1000 / r["steps_per_s"]
        if gt64:
            r["ratio_to_gt_64px"] = r["steps_per_s"] / gt64
        print(f"{r['env']:40s} {r['steps_per_s']:8.1f} steps/s {r['ms_per_step']:7.1f} ms"
              + (f" x{r['ratio_to_gt_64px']:.2f}" if gt64 else ""))
    payload["rows"] = rows
    if gt64 and not args.skip_learned and 16 in args.vector_sizes:
        by = {r["env"]: r["steps_per_s"] for r in rows}
        info = payload["learned"]
        payload["targets"] = {
            "single_learned_vs_gt_64px": by["learned-single"] / gt64,
            "vector16_learned_vs_gt_64px": by["learned-vector-N16"] / gt64,
            **({"single_learned_compiled_vs_gt_64px": by["learned-single-compiled"] / gt64,
                "vector16_learned_compiled_vs_gt_64px": by["learned-vector-N16-compiled"] / gt64}
               if "learned-single-compiled" in by else {}),
            "kv_cache_speedup_env_step": by["learned-single"] / by["learned-single-no-kv-cache"],
            "kv_cache_speedup_trunk": info["trunk_ms_per_frame_uncached"] / info["trunk_ms_per_frame_cached"],
            **{f"interleaved_{'single' if r['num_envs'] == 1 else 'vector16'}_{r['variant']}_vs_gt_64px":
               r["median_ratio_to_gt"] for r in rows if r["env"].startswith("interleaved-")},
        }
    name = "env_speed" if args.device == "cpu" else f"env_speed_{args.device.split(':')[0]}"
    write_result(name + (f"_threads{args.threads}" if args.threads else ""), payload, module="env_speed")
    return payload


if __name__ == "__main__":
    main()
