"""benchmarks/frame_state_consistency.py: the probe reads positions from frames; the benchmark end to end."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dot_frames(positions: np.ndarray) -> np.ndarray:
    """64x64 table-white frames with a red 4x4 square whose pixel position is a linear map of (x, y)."""
    frames = np.full((len(positions), 64, 64, 3), 230, np.uint8)
    for frame, (x, y) in zip(frames, positions, strict=True):
        col, row = int(8 + (x + 0.1) * 220), int(8 + (y + 0.1) * 220)
        frame[row:row + 4, col:col + 4] = (180, 20, 30)
    return frames


def test_probe_reads_what_the_frame_shows():
    from benchmarks.frame_state_consistency import errors, fit_probe

    rng = np.random.default_rng(0)
    xy = rng.uniform(-0.1, 0.1, (400, 2))
    # gripper and cube drawn alike: the cube is the dot, the gripper the dot shifted by a fixed offset
    targets = np.concatenate([xy, np.full((400, 1), 0.9), xy + 0.02, np.full((400, 1), 0.82)], 1).astype(np.float32)
    frames = dot_frames(xy)
    probe = fit_probe(frames[:300], targets[:300], steps=600, width=8, lr=3e-3, progress=False)
    consistent = errors(probe.read(frames[300:]), targets[300:])
    shuffled = errors(probe.read(frames[300:]), targets[300:][rng.permutation(100)])
    # frames that show the state: a small error; frames paired with other states: several times larger
    assert max(consistent["cube_cm"][:2]) < 2.0
    assert min(shuffled["cube_cm"][:2]) > 3 * max(consistent["cube_cm"][:2])
    assert consistent["gripper_to_cube_cm"][2] < 0.5  # a constant offset is read as constant
    with pytest.raises(ValueError, match="as many targets"):
        fit_probe(frames[:3], targets[:2], steps=1)


@pytest.mark.slow
def test_frame_state_consistency_end_to_end(tmp_path, monkeypatch):
    import benchmarks.common as common
    import benchmarks.frame_state_consistency as fsc
    import benchmarks.verdict_agreement as va
    from hma_gym.cli import main as cli

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(va, "CACHE", tmp_path / "cache")
    data = tmp_path / "lift.hdf5"
    cli(["collect", "--out", str(data), "--episodes", "3", "--no-progress", "--max-steps", "6"])
    payload = fsc.main(["--data", str(data), "--probe-demos", "3", "--probe-valid", "1", "--probe-frames", "4",
                        "--probe-steps", "5", "--policies", "expert", "random", "--episodes", "2", "--max-steps",
                        "3", "--num-envs", "2", "--variant", "fast", "--near", "10"])
    saved = json.loads((tmp_path / "frame_state_consistency.json").read_text())
    assert saved["probe"]["train_frames"] == 8 and saved["probe"]["held_out_all"]["n"] == 4
    for row in saved["policies"].values():
        # every step is compared (--near 10 m): 2 episodes x 3 steps
        assert row["frame_vs_state"]["n"] == 6 and len(row["per_episode"]) == 2
        assert all(e["near_steps"] == 3 for e in row["per_episode"])
        assert np.isfinite(row["frame_vs_state"]["gripper_cm"]).all()
        assert row["agreement"] == np.mean([e["gt"] == e["learned"] for e in row["per_episode"]])
    assert payload["checkpoint_weights_hash"] == saved["checkpoint_weights_hash"]
