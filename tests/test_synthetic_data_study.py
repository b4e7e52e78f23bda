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
    assert (tmp_path / "w" / "calibration" / "real2_2" / "policy.json").is_file()  # one run per budget
    assert (tmp_path / "cal_calibration.json").is_file()
    # a re-run reuses every trained policy and GT report: no command runs
    monkeypatch.setattr(sd, "run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    again = sd.main(args)
    assert again["curve"] == payload["curve"] and again["chosen_steps"] == payload["chosen_steps"]
    with pytest.raises(SystemExit):  # more real demos than the file holds
        sd.main([*args[:4], "--n", "2", *args[6:]])
    assert "mask/train has 3 demos, the calibration needs 4" in capsys.readouterr().err


def test_study_rows_are_independent_jobs_and_a_killed_study_resumes(tmp_path, monkeypatch):
    import benchmarks.common as common
    import benchmarks.synthetic_data as sd
    from training.collect import CollectConfig, collect

    data = tmp_path / "real.hdf5"
    collect(CollectConfig(out=str(data), episodes=3, max_steps=8, seed=3, valid_every=0, progress=False))
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sd, "RESULTS", tmp_path)
    args = ["--real", str(data), "--real-key", "train", "--n", "1", "--real-multiple", "2", "--kinds", "new",
            "--multiples", "1", "--steps", "2", "--batch-size", "2", "--episodes", "1", "--jobs", "1",
            "--work", str(tmp_path / "w"), "--result", "study"]
    real_run, ran = sd.run, []

    def killed_at_the_mix(cmd, log):  # the mixed row's training dies
        if "train-policy" in cmd and "--extra-data" in cmd:
            raise RuntimeError("killed")
        ran.append(cmd)
        real_run(cmd, log)

    monkeypatch.setattr(sd, "run", killed_at_the_mix)
    with pytest.raises(RuntimeError, match="killed"):
        sd.main(args)
    assert (tmp_path / "w" / "real1" / "gt_eval.json").is_file()
    ran.clear()
    monkeypatch.setattr(sd, "run", lambda cmd, log: (ran.append(cmd), real_run(cmd, log)))
    payload = sd.main(args)
    # the finished rows are reused; the synthetic file is resumed (nothing made again); the mixed row runs
    assert [c[c.index("hma_gym.cli") + 1] for c in ran] == ["synthesize", "train-policy", "evaluate"]
    log = (tmp_path / "w" / "synthesize_new.log").read_text()
    assert '"kept_from_before": 2' in log and '"made": 0' in log
    assert [r["name"] for r in payload["rows"]] == ["real1", "real1_new1", "real2"]
    mix = payload["rows"][1]
    assert mix["kind"] == "new" and mix["synthetic_demos"] == 1 and mix["train_demos"] == 2
    assert 0.0 <= mix["gt_ci95"][0] <= mix["gt_success"] <= mix["gt_ci95"][1] <= 1.0
    new = payload["synthetic"]["new"]
    assert new["policy"] == "expert" and new["verdicts"]["episodes"] == 2 and new["verdicts"]["judged_success"] >= 1
    assert set(payload["targets"]["new"]) == {"within_10_points_of_all_real", "10_points_over_small_real"}
    assert (tmp_path / "study.json").is_file() and (tmp_path / "study.png").is_file()


def test_the_control_replays_synthetic_episodes_in_mujoco_from_their_starts(tmp_path, capsys):
    """Replayed episodes of a GT file, replayed again in MuJoCo: the same actions from the same seeds give back
    the GT file's own frames, so the control's frames are MuJoCo's for exactly the synthetic episodes."""
    import h5py
    import numpy as np

    import benchmarks.synthetic_data as sd
    from training.collect import CollectConfig, collect
    from training.synthesize import SynthesizeConfig, synthesize

    real, other = tmp_path / "real.hdf5", tmp_path / "other.hdf5"
    collect(CollectConfig(out=str(real), episodes=2, max_steps=6, seed=3, valid_every=0, progress=False))
    collect(CollectConfig(out=str(other), episodes=1, max_steps=2, seed=40, valid_every=0, progress=False))
    synth = tmp_path / "synth.hdf5"
    synthesize(SynthesizeConfig(out=str(synth), actions=str(real), split="all", num_envs=2, valid_every=0,
                                progress=False))
    out = tmp_path / "control.hdf5"
    sd.in_mujoco(synth, str(real), out, "train", 2)
    report = sd.mujoco_summary(synth, out, "train", frames=True)
    assert report["episodes"] == 2 and set(report["frame_psnr_vs_gt_by_step"]) == {"1-10"}
    with h5py.File(synth, "r") as fs, h5py.File(out, "r") as fo, h5py.File(real, "r") as fr:
        assert report["mujoco_success"] == sum(bool(fr[f"data/demo_{i}"].attrs["success"]) for i in range(2))
        for i in range(2):
            source = str(fs[f"data/demo_{i}"].attrs["source_demo"])
            np.testing.assert_array_equal(fo[f"data/demo_{i}/actions"][()], fs[f"data/demo_{i}/actions"][()])
            np.testing.assert_array_equal(fo[f"data/demo_{i}/obs/agentview_image"][()],
                                          fr[f"data/{source}/obs/agentview_image"][()])
        assert sorted(n.decode() for n in fo["mask/train"][()]) == ["demo_0", "demo_1"]
    with pytest.raises(RuntimeError, match="not a first frame"):
        sd.in_mujoco(synth, str(other), tmp_path / "bad.hdf5", "train", 2)
    assert not (tmp_path / "bad.hdf5").exists()
    # the policy from the same starts, acting on MuJoCo's state: its episodes begin where the synthetic ones do
    sd.in_mujoco(synth, str(real), tmp_path / "acted.hdf5", "train", 2, policy="expert")
    acted = sd.mujoco_summary(synth, tmp_path / "acted.hdf5", "train", frames=False)
    assert acted["episodes"] == 2 and "frame_psnr_vs_gt_by_step" not in acted
    with h5py.File(tmp_path / "acted.hdf5", "r") as fa, h5py.File(real, "r") as fr, h5py.File(synth, "r") as fs:
        for i in range(2):
            source = str(fs[f"data/demo_{i}"].attrs["source_demo"])
            np.testing.assert_array_equal(fa[f"data/demo_{i}/obs/agentview_image"][0],
                                          fr[f"data/{source}/obs/agentview_image"][0])
    with pytest.raises(SystemExit):
        sd.main(["--real", str(real), "--kinds", "replayed", "new_in_mujoco", "--source", str(real)])
    assert "the controls run from the new kind's starts: add --kinds new" in capsys.readouterr().err
