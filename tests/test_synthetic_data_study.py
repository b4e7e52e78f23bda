"""benchmarks/synthetic_data.py --calibrate on a tiny budget: two rows, every budget evaluated, results reused."""

import pytest

pytestmark = pytest.mark.slow


def test_calibration_evaluates_each_budget_and_reuses_finished_steps(tmp_path, monkeypatch, capsys):
    import benchmarks.common as common
    import benchmarks.synthetic_data as sd
    from training.collect import CollectConfig, collect

    data = tmp_path / "real.hdf5"
    collect(CollectConfig(out=str(data), episodes=3, max_steps=8, seed=3, valid_every=0, progress=False))
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    args = ["--real", str(data), "--real-key", "train", "--n", "1", "--real-multiple", "2", "--calibrate", "4", "2",
            "--batch-size", "2", "--episodes", "1", "--jobs", "1", "--work", str(tmp_path / "w"), "--result", "cal"]
    payload = sd.main(args)
    assert [r["real"] for r in payload["rows"]] == [1, 2]
    assert [c["steps"] for c in payload["curve"]] == [2, 4]
    for c in payload["curve"]:
        assert c["gap"] == c["ten_n_real"] - c["n_real"] and 0.0 <= c["n_real"] <= 1.0
    assert (tmp_path / "w" / "calibration" / "real2" / "iter_2" / "policy.json").is_file()
    assert (tmp_path / "cal_calibration.json").is_file()
    # a re-run reuses every trained policy and GT report: no command runs
    monkeypatch.setattr(sd, "run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    again = sd.main(args)
    assert again["curve"] == payload["curve"] and again["chosen_steps"] == payload["chosen_steps"]
    with pytest.raises(SystemExit):  # more real demos than the file holds
        sd.main([*args[:4], "--n", "2", *args[6:]])
    assert "mask/train has 3 demos, the calibration needs 4" in capsys.readouterr().err
