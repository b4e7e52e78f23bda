"""benchmarks/verdict_agreement.py end to end on a tiny budget: GT side cached, learned side paired."""

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_verdict_agreement_records_paired_verdicts(tmp_path, monkeypatch):
    import benchmarks.common as common
    import benchmarks.verdict_agreement as va

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(va, "RESULTS", tmp_path)
    monkeypatch.setattr(va, "CACHE", tmp_path / "cache")
    args = ["--policies", "random", "missed_2cm", "--episodes", "2", "--max-steps", "4", "--num-envs", "2",
            "--variant", "fast", "--result", "va"]
    payload = va.main(args)
    saved = json.loads((tmp_path / "va.json").read_text())
    assert (tmp_path / "va.png").exists() and saved["seeds"] == [900000, 900001]
    rows = {r["name"]: r for r in saved["policies"]}
    assert rows["random"]["learned_mode"] == "closed-loop" and rows["missed_2cm"]["learned_mode"] == "replay"
    for r in rows.values():
        gt, learned = np.array(r["per_episode"]["gt"]), np.array(r["per_episode"]["learned"])
        assert len(gt) == len(learned) == 2
        assert r["per_episode_agreement"] == np.mean(gt == learned)
        assert r["gt_success"] == gt.mean() and r["learned_success"] == learned.mean()
    assert saved["max_abs_rate_error"] == max(abs(r["gt_success"] - r["learned_success"]) for r in rows.values())
    # the GT side is cached: a second run reads it (and gives the same GT verdicts) without MuJoCo
    assert len(list((tmp_path / "cache").glob("gt_*.npz"))) == 2
    # with a state model, the picture's verdict is recorded beside the state's
    for r in rows.values():
        assert 0.0 <= r["image_state_agreement"] <= 1.0 and 0.0 <= r["image_success"] <= 1.0
    monkeypatch.setattr(va.gym, "make", _refuse_gt(va.gym.make))
    again = va.main(args)
    assert [r["per_episode"]["gt"] for r in again["policies"]] == [r["per_episode"]["gt"] for r in payload["policies"]]
    # scripted policies can also act on the learned env's own predicted state
    closed = va.main([*args[:-1], "va_closed", "--scripted", "closed-loop"])
    assert {r["name"]: r["learned_mode"] for r in closed["policies"]} == {"random": "closed-loop",
                                                                          "missed_2cm": "closed-loop"}


def _refuse_gt(make):
    def wrapped(env_id, *args, **kwargs):
        if env_id == "RobomimicLift-v0":
            raise AssertionError("the GT side should come from the cache")
        return make(env_id, *args, **kwargs)

    return wrapped
