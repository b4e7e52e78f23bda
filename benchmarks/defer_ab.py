"""Deferred vs eager history pass, A/B in one process: time per learned-env step (generate the next frame,
append it to the key/value cache, decode, success detector) for N envs, eager and deferred steps
alternating so that both see the same machine load.

Eager: the new frame's keys/values are computed by their own trunk call. Deferred
(`WorldModel.observe(..., defer=True)`): they are computed inside the next step's first unmasking pass.
The learned env defers where this pays (`hma_gym.envs.learned_env.DEFER_MAX_BATCH_CPU`).

    python -m benchmarks.defer_ab [--sizes 1 4 8 16] [--steps 40] [--checkpoint DIR] [--threads N]

Writes benchmarks/results/defer_ab.json: rows [{num_envs, eager_ms, deferred_ms, speedup}] (medians).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import write_result
from hma_gym.envs.learned_env import default_checkpoint
from hma_gym.world_model import WorldModel


def ab(wm: WorldModel, n: int, steps: int, seed: int = 0) -> dict:
    gen = torch.Generator(device=wm.device).manual_seed(seed)
    frames = torch.zeros(n, wm.image_size, wm.image_size, 3, dtype=torch.uint8)
    states = torch.zeros(n, wm.state_dim)
    caches = {}
    for defer in (False, True):
        caches[defer] = wm.new_cache(n)
        wm.observe(caches[defer], wm.encode(frames), states, defer=defer)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps + 3):  # the first 3 of each are warm-up
        for defer in (False, True) if i % 2 else (True, False):
            action = torch.rand(n, wm.action_dim, generator=gen) * 2 - 1
            t0 = time.perf_counter()
            tokens, s = wm.generate(caches[defer], action, generator=gen)
            wm.observe(caches[defer], tokens, s, action, defer=defer)
            wm.success_prob(wm.decode(tokens), s)
            times[defer].append(time.perf_counter() - t0)
    eager, deferred = (1000 * float(np.median(times[d][3:])) for d in (False, True))
    return {"num_envs": n, "eager_ms": eager, "deferred_ms": deferred, "speedup": eager / deferred}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="numbers of envs N")
    p.add_argument("--steps", type=int, default=40, help="timed steps of each kind per N")
    p.add_argument("--checkpoint", default=None, help="default: the shipped Lift checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or default_checkpoint()
    wm = WorldModel.from_checkpoint(checkpoint, device=args.device)
    rows = []
    for n in args.sizes:
        rows.append(ab(wm, n, args.steps))
        r = rows[-1]
        print(f"N={n:3d} eager {r['eager_ms']:7.1f} ms  deferred {r['deferred_ms']:7.1f} ms  x{r['speedup']:.3f}")
    write_result("defer_ab", {"checkpoint": str(checkpoint), "steps": args.steps,
                              "device": args.device, "rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
