"""`hma-gym synthesize` (training/synthesize.py): what it records, its errors, and resuming."""

import h5py
import numpy as np
import pytest

from hma_gym.data.hdf5 import DatasetError, RobomimicWriter, list_demos, read_env_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """5 short GT episodes at 64x64 (with `object`), all in the train split."""
    from training.collect import CollectConfig, collect

    path = tmp_path_factory.mktemp("synth") / "src.hdf5"
    collect(CollectConfig(out=str(path), episodes=5, max_steps=4, seed=5, valid_every=0, progress=False))
    return path


def run(out, **kwargs):
    from training.synthesize import SynthesizeConfig, synthesize

    return synthesize(SynthesizeConfig(out=str(out), num_envs=2, progress=False, **kwargs))


def contents(path) -> dict:
    """Every dataset and attribute of every demo, by demo name."""
    out = {}
    with h5py.File(path, "r") as f:
        for name in list_demos(path):
            g = f[f"data/{name}"]
            keys = []
            g.visit(keys.append)
            out[name] = ({k: g[k][()] for k in keys if isinstance(g[k], h5py.Dataset)}, dict(g.attrs))
        out["mask"] = {k: sorted(f[f"mask/{k}"][()]) for k in f["mask"]}
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["mask"] == b["mask"]
    for name in a:
        if name == "mask":
            continue
        (da, aa), (db, ab) = a[name], b[name]
        assert da.keys() == db.keys() and aa.keys() == ab.keys()
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=f"{name}/{k}")
        for k in aa:
            assert aa[k] == ab[k], f"{name} attr {k}"


def interrupt_after(monkeypatch, n: int) -> None:
    """The n+1-th finished episode is never written: a kill in the middle of a batch."""
    write, calls = RobomimicWriter.write_episode, []

    def write_then_die(self, ep, **attrs):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return write(self, ep, **attrs)

    monkeypatch.setattr(RobomimicWriter, "write_episode", write_then_die)


def test_replay_records_the_verdict_and_the_object_state(source, tmp_path):
    out = tmp_path / "s.hdf5"
    report = run(out, actions=str(source), split="all")
    assert report["demos"] == 5 and report["made"] == 5 and report["kept_from_before"] == 0
    with h5py.File(out, "r") as f:
        for name in list_demos(out):
            g = f[f"data/{name}"]
            assert g["obs/object"].shape == (4, 10) and g["next_obs/object"].shape == (4, 10)
            assert {"success", "unjudged", "max_uncertainty", "source_demo", "seed"} <= set(g.attrs)
            assert 0.0 <= g.attrs["max_uncertainty"] <= 1.0
    assert read_env_args(out)["synthesize"] == {"actions": str(source), "split": "all", "policy": "", "seed": 0,
                                                "num_envs": 2, "max_steps": 100,
                                                "steps_after_success": 10}
    again = run(out, actions=str(source), split="all", episodes=3)  # fewer than the file holds: nothing lost
    assert again["demos"] == 5 and again["made"] == 0
    other = tmp_path / "other.hdf5"
    other.write_bytes(source.read_bytes())
    with pytest.raises(DatasetError, match="--actions"):  # another source: refused, the file untouched
        run(out, actions=str(other), split="all")
    assert len(list_demos(out)) == 5


def test_a_file_without_the_settings_it_was_made_with_is_not_resumed(source, tmp_path):
    import json

    out = tmp_path / "old.hdf5"
    run(out, actions=str(source), split="all", episodes=2)
    with h5py.File(out, "a") as f:  # as an older synthesize left it
        env_args = json.loads(f["data"].attrs["env_args"])
        del env_args["synthesize"]
        f["data"].attrs["env_args"] = json.dumps(env_args)
    with pytest.raises(DatasetError, match="cannot be resumed exactly"):
        run(out, actions=str(source), split="all")
    assert len(list_demos(out)) == 2


def test_unjudged_or_failed_episodes_stay_out_of_train_success(tmp_path):
    writer = RobomimicWriter(tmp_path / "m.hdf5", {"env_name": "Lift"}, valid_every=0)
    from hma_gym.data.hdf5 import EpisodeBuffer

    obs = {"x": np.zeros(2, np.float32)}
    for attrs in ({"success": True, "unjudged": False}, {"success": True, "unjudged": True},
                  {"success": False, "unjudged": False}, {"success": True}):
        ep = EpisodeBuffer()
        ep.add_step(obs, np.zeros(7, np.float32), 0.0, True, obs)
        writer.write_episode(ep, **attrs)
    assert list_demos(tmp_path / "m.hdf5", "train") == ["demo_0", "demo_1", "demo_2", "demo_3"]
    assert list_demos(tmp_path / "m.hdf5", "train_success") == ["demo_0", "demo_3"]
    writer.truncate(2)
    assert list_demos(tmp_path / "m.hdf5") == ["demo_0", "demo_1"]
    assert list_demos(tmp_path / "m.hdf5", "train_success") == ["demo_0"]


def test_an_empty_split_or_a_bad_input_is_an_error_that_leaves_no_file(source, tmp_path, monkeypatch):
    out = tmp_path / "s.hdf5"
    with pytest.raises(DatasetError, match=r"split 'valid' holds no demos \(5 in the file: train 5, valid 0\)"):
        run(out, actions=str(source))  # the default split: this file holds no held-out demos
    assert not out.exists()
    with pytest.raises(ValueError, match="nonsense"):
        run(out, policy="nonsense")
    assert not out.exists()
    interrupt_after(monkeypatch, 0)  # killed before its first episode is written
    with pytest.raises(KeyboardInterrupt):
        run(out, actions=str(source), split="all")
    assert not out.exists()


@pytest.mark.parametrize("mode", ["replay", "policy"])
def test_a_resumed_run_writes_the_file_an_uninterrupted_one_does(source, tmp_path, monkeypatch, mode):
    kwargs = dict(actions=str(source), split="all") if mode == "replay" else dict(policy="random", episodes=5,
                                                                                  max_steps=3)
    whole = tmp_path / "whole.hdf5"
    run(whole, **kwargs)
    resumed = tmp_path / "resumed.hdf5"
    interrupt_after(monkeypatch, 3)  # batches [0, 1] [2, 3] [4]: killed inside the second
    with pytest.raises(KeyboardInterrupt):
        run(resumed, **kwargs)
    monkeypatch.undo()
    assert len(list_demos(resumed)) == 3
    report = run(resumed, **kwargs)
    assert report["kept_from_before"] == 2 and report["made"] == 3  # the unfinished batch made again whole
    assert_same(contents(whole), contents(resumed))
    with pytest.raises(DatasetError, match="--num-envs 2"):
        from training.synthesize import SynthesizeConfig, synthesize

        synthesize(SynthesizeConfig(out=str(resumed), num_envs=3, progress=False, **kwargs))
    if mode == "policy":  # the episodes' end is a setting of policy mode; replayed ones end where their source did
        with pytest.raises(DatasetError, match="--steps-after-success 10"):
            run(resumed, steps_after_success=2, **kwargs)
    else:
        assert run(resumed, steps_after_success=2, **kwargs)["made"] == 0


def test_policy_episodes_end_steps_after_success_as_collect_records_them(tmp_path):
    out = tmp_path / "p.hdf5"
    run(out, policy="expert", episodes=2, steps_after_success=3)
    lengths = []
    with h5py.File(out, "r") as f:
        for name in list_demos(out):
            g = f[f"data/{name}"]
            rewards = g["rewards"][()]
            if g.attrs["success"]:  # ends 3 steps after the first success, not at --max-steps
                assert len(rewards) == int(np.argmax(rewards > 0)) + 4
            else:
                assert len(rewards) == 100
            lengths.append(len(rewards))
    assert any(n < 100 for n in lengths)  # the expert succeeds in the learned env
    with pytest.raises(ValueError, match="steps_after_success"):
        run(tmp_path / "bad.hdf5", policy="expert", steps_after_success=-1)
