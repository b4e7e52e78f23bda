"""Smoke runs of the CLI entry points."""

import json
import math

import pytest

from hma_gym.cli import COMMANDS, main
from hma_gym.data.hdf5 import read_demo, validate_file


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.slow
def test_collect_then_render(tmp_path):
    data = tmp_path / "lift.hdf5"
    main(["collect", "--out", str(data), "--episodes", "2", "--image-size", "32", "--no-progress",
          "--failure-probs", json.dumps({"missed_grasp": 0.5})])
    info = validate_file(data)
    assert info["demos"] == 2
    out = tmp_path / "lift48.hdf5"
    main(["render", "--data", str(data), "--out", str(out), "--image-size", "48", "--no-progress"])
    a, b = read_demo(data, "demo_0", next_obs=True), read_demo(out, "demo_0", next_obs=True)
    assert b["obs"]["agentview_image"].shape[1:] == (48, 48, 3)
    assert a["obs"]["agentview_image"].shape[1:] == (32, 32, 3)
    # the re-rendered frames are the same scene: shrink to 32 px roughly matches the original
    big = b["obs"]["agentview_image"][0].astype(float)
    assert abs(big.mean() - a["obs"]["agentview_image"][0].astype(float).mean()) < 12
    # next_obs[t] is obs[t+1] in the re-rendered file too
    assert (b["next_obs"]["agentview_image"][0] == b["obs"]["agentview_image"][1]).all()


def test_bad_argument_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["collect", "--out", str(tmp_path / "x.hdf5"), "--episodes", "0"])
    assert "episodes must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs(tiny_checkpoint, tmp_path):
    from policies.demo import DemoConfig, demo

    report = demo(DemoConfig(policy="expert", episodes=1, checkpoint=str(tiny_checkpoint),
                             video=str(tmp_path / "demo.mp4")))
    assert report["episodes"] == 1 and (tmp_path / "demo.mp4").stat().st_size > 1000
    assert report["gt_success_rate"] == 1.0 and 0.0 <= report["learned_success_rate"] <= 1.0
    speeds = [report["gt_steps_per_s"], report["learned_steps_per_s"]]
    assert all(math.isfinite(v) and v > 0 for v in speeds), speeds


def test_repeated_list_flags_add_up():
    """`--allow-origin A --allow-origin B C` keeps all three (argparse's default keeps the last repeat only)."""
    from hma_gym.cli import build_parser

    args = build_parser(load="serve").parse_args(
        ["serve", "--allow-origin", "http://a:1", "--allow-origin", "http://b:2", "http://c:3"])
    assert args.allow_origin == ["http://a:1", "http://b:2", "http://c:3"]
    assert not hasattr(build_parser(load="serve").parse_args(["serve"]), "allow_origin")  # the default stays
