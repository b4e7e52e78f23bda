"""Reference outputs of the shipped world models, saved so a refactor of the model can be checked against them.

For each shipped checkpoint (hma_gym/assets: lift, lift_fast, lift_15k, lift_mar) this runs the path the
learned env runs (``WorldModel.encode`` / ``observe`` / ``generate``, eager appends, float32 on CPU, one
thread) from a fixed start: the first two initial observations of the checkpoint's bank and a fixed action
sequence. It records

- ``prompt``: the encoded first frames (codes, or latents for mar);
- ``greedy``, ``greedy_states``: GREEDY_FRAMES frames generated greedily, each appended to the history;
- ``sampled``, ``sampled_states``: SAMPLED_FRAMES more frames sampled at temperature 1 from one generator
  seeded with 0, each appended;
- ``reset``, ``reset_states``: row 1 alone is reset to bank observation 2 (a row-masked cache reset and
  append, as a vector env does), then one greedy frame of that row.

``python -m tests.make_reference_outputs`` writes tests/data/reference_<checkpoint>.safetensors;
tests/test_reference_outputs.py regenerates them and compares (codes exactly, mar latents within 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hma_gym.checkpoint import load_tensors, save_tensors
from hma_gym.world_model import WorldModel

ASSETS = Path(__file__).resolve().parent.parent / "hma_gym" / "assets"
DATA = Path(__file__).resolve().parent / "data"
CHECKPOINTS = ("lift", "lift_fast", "lift_15k", "lift_mar")
GREEDY_FRAMES = 3
SAMPLED_FRAMES = 2
STEPS = 2  # unmasking passes per frame (the shipped checkpoints' generation.steps)
PROPRIO = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")


def actions(t: int) -> torch.Tensor:
    """The fixed action a_t (2, 7) of both rows: move down (row 0 also left, row 1 right) with the gripper open."""
    a = torch.tensor([[-0.3, 0.0, -0.6, 0.0, 0.0, 0.0, -1.0], [0.3, 0.1, -0.6, 0.0, 0.0, 0.0, -1.0]])
    return a * (1.0 - 0.1 * t)


def bank_start(checkpoint: Path, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (B, H, W, 3) and raw states (B, 9) of the given entries of a checkpoint's bank."""
    bank = load_tensors(checkpoint / "init_bank.safetensors")
    states = torch.cat([bank[k][index].float().reshape(len(index), -1) for k in PROPRIO], dim=1)
    return bank["agentview_image"][index], states


@torch.no_grad()
def reference_outputs(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Run the fixed start and actions through a checkpoint's world model; see the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order every run
    try:
        wm = WorldModel.from_checkpoint(checkpoint)
        frames, states = bank_start(checkpoint, [0, 1])
        cache = wm.new_cache(2)
        out = {"prompt": wm.encode(frames)}
        wm.observe(cache, out["prompt"], states)
        greedy, greedy_states = [], []
        for t in range(GREEDY_FRAMES):
            tokens, states = wm.generate(cache, actions(t), steps=STEPS, greedy=True)
            wm.observe(cache, tokens, states, actions(t))
            greedy.append(tokens)
            greedy_states.append(states)
        out["greedy"], out["greedy_states"] = torch.stack(greedy, 1), torch.stack(greedy_states, 1)
        gen = torch.Generator().manual_seed(0)
        sampled, sampled_states = [], []
        for t in range(GREEDY_FRAMES, GREEDY_FRAMES + SAMPLED_FRAMES):
            tokens, states = wm.generate(cache, actions(t), steps=STEPS, generator=gen)
            wm.observe(cache, tokens, states, actions(t))
            sampled.append(tokens)
            sampled_states.append(states)
        out["sampled"], out["sampled_states"] = torch.stack(sampled, 1), torch.stack(sampled_states, 1)
        # a vector env resets row 1 alone: the row-masked cache reset and the append to that row only
        frames, states = bank_start(checkpoint, [0, 2])
        rows = torch.tensor([False, True])
        cache.reset(rows)
        wm.observe(cache, wm.encode(frames), states, rows=rows)
        tokens, states = wm.generate(cache, actions(0), steps=STEPS, greedy=True)
        out["reset"], out["reset_states"] = tokens[1:], states[1:]
    finally:
        torch.set_num_threads(threads)
    return {k: v.to(torch.int32) if not v.is_floating_point() else v.float() for k, v in out.items()}


def reference_path(name: str) -> Path:
    return DATA / f"reference_{name}.safetensors"


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name in CHECKPOINTS:
        out = reference_outputs(ASSETS / name)
        save_tensors(reference_path(name), out, metadata={"checkpoint": f"hma_gym/assets/{name}"})
        print(f"{reference_path(name)}: {reference_path(name).stat().st_size / 1024:.0f} KB",
              {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
