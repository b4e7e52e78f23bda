"""`hma-gym evaluate` on both kinds of env, and policy loading by spec."""

import json

import numpy as np
import pytest

from hma_gym.cli import main
from hma_gym.metrics import wilson_interval
from policies.registry import load_policy


@pytest.mark.slow
def test_evaluate_expert_in_gt_env(tmp_path):
    out = tmp_path / "gt.json"
    main(["evaluate", "--policy", "expert", "--env", "RobomimicLift-v0", "--episodes", "2", "--out", str(out),
          "--videos", "1"])
    report = json.loads(out.read_text())
    assert report["success_rate"] == 1.0 and report["episodes"] == 2 and not report["learned"]
    assert report["success_ci95"][0] < 1.0 <= report["success_ci95"][1]
    assert report["env_steps"] == sum(e["length"] for e in report["per_episode"]) and len(report["videos"]) == 1
    assert np.isfinite(report["wall_time_s"]) and report["wall_time_s"] > 0
    assert report["steps_per_s"] == pytest.approx(report["env_steps"] / report["wall_time_s"])


@pytest.mark.slow
def test_evaluate_random_policy_in_learned_env_batched(tiny_checkpoint, tmp_path):
    out = tmp_path / "learned.json"
    main(["evaluate", "--policy", "random", "--env", "HMA-RobomimicLift-v0", "--checkpoint", str(tiny_checkpoint),
          "--episodes", "3", "--num-envs", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["learned"] and report["episodes"] == 3
    assert report["checkpoint"] == str(tiny_checkpoint)
    assert [e["seed"] for e in report["per_episode"]] == [10000, 10001, 10002]
    assert all(1 <= e["length"] <= 100 for e in report["per_episode"])


@pytest.mark.slow
def test_policy_specs(tiny_checkpoint):
    from hma_gym.envs.learned_env import HMAEnv

    with pytest.raises(ValueError, match="ground-truth"):
        load_policy("expert", HMAEnv(checkpoint=tiny_checkpoint))
    with pytest.raises(ValueError, match="unknown policy"):
        load_policy("no-such-policy")
    with pytest.raises(ValueError, match="ALGO:PATH"):
        load_policy("sb3:nonsense")


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_correlation_metrics_against_hand_computed_values():
    from hma_gym.metrics import mmrv, pearson, spearman

    real = [0.2, 0.4, 0.6, 0.8]
    assert pearson(real, [0.1, 0.3, 0.5, 0.7]) == pytest.approx(1.0)
    assert spearman(real, [0.1, 0.5, 0.3, 0.7]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert mmrv(real, [0.1, 0.3, 0.5, 0.7]) == 0.0
    # sim swaps policies 1 and 2 (real gap 0.2): each of them has a max violation of 0.2 -> mean 0.1
    assert mmrv(real, [0.1, 0.5, 0.3, 0.7]) == pytest.approx(0.1)
    # sim ranks everything backwards: worst gaps 0.6, 0.4, 0.4, 0.6 -> 0.5
    assert mmrv(real, [0.7, 0.5, 0.3, 0.1]) == pytest.approx(0.5)
    assert pearson([0.1, 0.2, 0.3], [0.3, 0.3, 0.3]) != pearson([0.1, 0.2, 0.3], [0.3, 0.3, 0.3])  # NaN


def test_episode_confusion_by_hand():
    from benchmarks.policy_eval_correlation import episode_confusion

    gt = [{"success": s} for s in (True, True, False, False, False)]
    learned = [{"success": s} for s in (True, False, True, True, False)]
    assert episode_confusion(gt, learned) == {"per_episode_agreement": 0.4, "gt_fail_learned_success": 2,
                                              "gt_success_learned_fail": 1}


def test_bootstrap_intervals_of_the_correlation():
    from benchmarks.policy_eval_correlation import bootstrap

    rng = np.random.default_rng(0)
    rates = [0.1, 0.3, 0.5, 0.7, 0.9]
    gt = [list(rng.random(50) < r) for r in rates]
    same = bootstrap(gt, gt, 200)  # a sim that agrees episode by episode: every resample is perfect
    assert same["pearson"] == pytest.approx([1.0, 1.0]) and same["mmrv"] == [0.0, 0.0] and same["resamples"] == 200
    noise = [list(rng.random(50) < 0.5) for _ in rates]  # verdicts unrelated to the GT ones
    unrelated = bootstrap(gt, noise, 200)
    assert unrelated["pearson"][0] < 0 < unrelated["pearson"][1]
    assert unrelated["mmrv"][1] > 0.1
