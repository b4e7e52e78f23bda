"""The training module end to end on a tiny real dataset: tokenizer, dynamics, resume, pack, eval-model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hma_gym.checkpoint import CheckpointError, check_checkpoint_dir, load_module_weights
from hma_gym.cli import main
from hma_gym.envs.learned_env import HMAEnv
from tests.conftest import DYN_ARGS
from tests.conftest import read_log as _log
from training.data import DataConfig, load_episodes, resize_frames
from training.loop import LoopConfig, lr_at


@pytest.mark.slow
def test_data_windows_and_resize(tiny_data):
    cfg = DataConfig(data=str(tiny_data), image_size=8)
    train, valid = load_episodes(cfg, "train"), load_episodes(cfg, "valid")
    assert len(train) == 6 and len(valid) == 2
    e = train[0]
    assert e.frames.shape[1:] == (8, 8, 3) and len(e.frames) == len(e.actions) + 1 == len(e.states)
    assert e.states.shape[1] == 9
    strided = load_episodes(DataConfig(data=str(tiny_data), image_size=16, action_stride=2), "train")[0]
    assert strided.actions.shape[1] == 14 and len(strided.frames) == len(strided.actions) + 1
    np.testing.assert_array_equal(strided.frames[1], load_episodes(DataConfig(data=str(tiny_data), image_size=16),
                                                                   "train")[0].frames[2])
    assert resize_frames(np.zeros((2, 16, 16, 3), np.uint8), 32).shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_key_map_reads_other_names(tiny_data):
    cfg = DataConfig(data=str(tiny_data), image_size=16, image_key="rgb", key_map={"rgb": "agentview_image"})
    assert load_episodes(cfg, "valid")[0].frames.shape[1:] == (16, 16, 3)
    with pytest.raises(ValueError, match="no observation 'nope'"):
        load_episodes(DataConfig(data=str(tiny_data), image_key="nope"), "valid")


def test_lr_schedule():
    cfg = LoopConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


@pytest.mark.slow
def test_tokenizer_trains(tokenizer_run):
    log = _log(tokenizer_run)
    train = [r for r in log if r["event"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in log if r["event"] == "eval"]
    assert evals and np.isfinite(evals[-1]["valid_psnr"])
    assert (tokenizer_run / "tokenizer.safetensors").exists() and (tokenizer_run / "tokenizer.json").exists()


@pytest.mark.slow
def test_dynamics_trains(dynamics_run):
    train = [r for r in _log(dynamics_run) if r["event"] == "train"]
    first, last = np.mean([r["ce"] for r in train[:2]]), np.mean([r["ce"] for r in train[-2:]])
    assert last < first
    meta = json.loads((dynamics_run / "dynamics.json").read_text())
    assert meta["config"]["embodiment"] == "panda_osc_pose"
    assert meta["config"]["hma"]["patch_size"] == 2
    norm = load_file(dynamics_run / "normalization.safetensors")
    assert set(norm) == {f"panda_osc_pose/{k}" for k in ("state_mean", "state_std", "action_mean", "action_std")}


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.slow
def test_resume_is_exact(tiny_data, tokenizer_run, tmp_path, ema):
    """6 steps in one go == 3 steps, stop, resume to 6 (with --ema: the average too, and it is what is exported)."""
    common = ["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--eval-every", "100",
              "--save-every", "3", *DYN_ARGS, *(["--ema"] if ema else [])]
    main([*common, "--out", str(tmp_path / "a"), "--steps", "6"])
    main([*common, "--out", str(tmp_path / "b"), "--steps", "3"])
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["step"] == 3
    main([*common, "--out", str(tmp_path / "b"), "--steps", "6"])
    a = load_file(tmp_path / "a" / "dynamics.safetensors")
    b = load_file(tmp_path / "b" / "dynamics.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(r["event"] == "resume" for r in _log(tmp_path / "b"))
    trained = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)["model"]
    if ema:
        assert int(trained["ema_step"]) == 6
        for key in a:  # the exported weights are the average, which lags the trained weights
            torch.testing.assert_close(a[key], trained[f"ema.{key}"], rtol=0, atol=0)
        assert any(not torch.equal(a[k], trained[f"model.{k}"]) for k in a)
        with pytest.raises(ValueError, match="ema=True"):  # the run's EMA state cannot be dropped silently
            main([*common[:-1], "--out", str(tmp_path / "a"), "--steps", "8"])
    else:
        for key in a:
            torch.testing.assert_close(a[key], trained[key], rtol=0, atol=0)


def test_ema_follows_diffusion_policy_schedule():
    from training.loop import EmaTrainee

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    trainee = EmaTrainee(net, power=0.5, max_decay=0.6)
    assert [trainee.decay(k) for k in (1, 2, 4, 100)] == pytest.approx([0.0, 1 - 2 ** -0.5, 0.5, 0.6])
    history = []
    for step in range(1, 6):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        history.append(net.weight.detach().clone())
        trainee.update_ema(step)
        trainee.update_ema(step)  # once per step: a second call is a no-op
    expected = history[0]
    for step, w in enumerate(history[1:], start=2):
        d = trainee.decay(step)
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(trainee.ema.weight, expected)
    assert not trainee.ema.weight.requires_grad and net.weight.requires_grad


@pytest.mark.slow
def test_corrupt_or_missing_weights_name_the_file(dynamics_run, tmp_path):
    from hma_gym.models.hma import HMA, HMAConfig

    meta = json.loads((dynamics_run / "dynamics.json").read_text())
    model = HMA(HMAConfig.from_dict(meta["config"]["hma"]))
    bad = tmp_path / "dynamics.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="dynamics.safetensors"):
        load_module_weights(model, bad)
    with pytest.raises(CheckpointError, match="missing file .*nothing.safetensors"):
        load_module_weights(model, tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_dir(tmp_path / "no_such_dir")


@pytest.mark.slow
def test_same_script_runs_under_torchrun(tiny_data, tokenizer_run, tmp_path):
    """Two CPU processes (gloo) train the dynamics model together; rank 0 writes the run."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "hma_gym.cli", "train", "--data", str(tiny_data),
           "--tokenizer", str(tokenizer_run), "--out", str(out), "--steps", "4", "--eval-every", "4",
           "--save-every", "4", "--device", "cpu", *DYN_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "dynamics.safetensors").exists()
    assert [r["step"] for r in _log(out) if r["event"] == "train"][-1] == 4


@pytest.mark.slow
def test_eval_model_reports_fidelity(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "eval.json"
    main(["eval-model", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--out", str(out),
          "--random-actions", "1", "--no-progress"])
    report = json.loads(out.read_text())
    for key in ("psnr", "ssim", "copy_last_prompt_psnr", "tokenizer_ceiling_psnr", "delta_psnr", "perplexity"):
        assert np.isfinite(report[key]), key
    assert len(report["psnr_per_frame"]) == 8 and report["windows"] >= 1
    assert 0 <= report["success_agreement_generated"]["accuracy"] <= 1
    assert report["free_run"]["horizon"] == 100 and len(report["free_run"]["buckets"]) == 10


@pytest.mark.slow
def test_eval_prompt_frames_score_the_same_generated_frames(tiny_checkpoint, tiny_data):
    from hma_gym.metrics import psnr
    from hma_gym.world_model import WorldModel
    from training.fidelity import eval_windows, fidelity_report, open_loop, tokenize_episodes

    wm = WorldModel.from_checkpoint(tiny_checkpoint)
    episodes = load_episodes(DataConfig(data=str(tiny_data), image_size=16), "valid")
    tokenize_episodes(wm, episodes)
    windows = eval_windows(episodes, 12, 8)
    reports = {n: fidelity_report(wm, episodes, windows, n_prompt=n, greedy=True, n_random=1) for n in (1, 4)}
    # the same 8 GT frames are scored: same copy baseline and tokenizer ceiling whatever the prompt length
    for key in ("copy_last_prompt_psnr", "tokenizer_ceiling_psnr"):
        assert reports[1][key] == pytest.approx(reports[4][key], abs=1e-9), key
    # one prompt frame: the frame just before the generated ones, then generation from it
    by_hand = open_loop(wm, episodes, [(i, s + 3) for i, s in windows], n_prompt=1, greedy=True)
    expected = psnr(by_hand["pred"], by_hand["gt"]).reshape(len(windows), 8).mean(0)
    np.testing.assert_allclose(reports[1]["psnr_per_frame"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="n_prompt"):
        fidelity_report(wm, episodes, windows, n_prompt=5)


@pytest.mark.slow
def test_decoder_finetune_keeps_every_code(tiny_data, tokenizer_run, tmp_path):
    from hma_gym.world_model import load_tokenizer

    out = tmp_path / "tok_ft"
    main(["train-tokenizer", "--data", str(tiny_data), "--out", str(out), "--preset", "tiny", "--image-size", "16",
          "--steps", "10", "--batch-size", "16", "--eval-every", "10", "--save-every", "10", "--threads", "1",
          "--init-from", str(tokenizer_run), "--freeze-encoder", "--temporal-weight", "0", "--no-progress"])
    frames = torch.from_numpy(load_episodes(DataConfig(data=str(tiny_data), image_size=16), "valid")[0].frames)
    before, after = load_tokenizer(tokenizer_run), load_tokenizer(out)
    assert torch.equal(before.encode(frames), after.encode(frames))
    assert not torch.equal(before.decode(before.encode(frames)), after.decode(after.encode(frames)))


@pytest.mark.slow
def test_calibrate_success_scores_rules_and_writes_the_choice(tiny_checkpoint, tiny_data, tmp_path):
    import shutil

    from training.calibrate import choose, first_run, score_rules

    # the rule arithmetic, by hand
    hits = np.array([[1, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=bool)
    assert first_run(hits, 1).tolist() == [True, True, True]
    assert first_run(hits, 2).tolist() == [True, False, True]
    assert first_run(hits, 3).tolist() == [False, False, True]
    probs = np.array([[0.9, 0.9, np.nan], [0.9, 0.1, 0.9], [0.2, 0.2, 0.2]], dtype=np.float32)
    rows = score_rules(probs, np.array([True, False, False]), thresholds=(0.5,), max_frames=2)
    assert [r["balanced_accuracy"] for r in rows] == [0.75, 1.0]  # k=1 calls row 2 a success; k=2 does not
    assert choose(rows, 0.5)["frames"] == 2

    # the command, on a copy of the tiny checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    out = tmp_path / "calib.json"
    main(["calibrate-success", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--image-size", "16",
          "--max-frames", "2", "--thresholds", "0.3", "0.6", "--out", str(out), "--write", "--no-progress"])
    report = json.loads(out.read_text())
    assert report["episodes"] >= 1 and report["split"] == "valid"
    assert len(report["rules"]) == 4
    generation = json.loads((ckpt / "config.json").read_text())["generation"]
    assert generation["success_threshold"] == report["chosen"]["threshold"]
    assert generation["success_frames"] == report["chosen"]["frames"]
    env = HMAEnv(checkpoint=ckpt)
    assert (env.sim.success_threshold, env.sim.success_frames) == (report["chosen"]["threshold"],
                                                                   report["chosen"]["frames"])


@pytest.mark.slow
def test_packed_checkpoint_is_a_source_for_fine_tuning_and_pack(tiny_checkpoint, tiny_data, tmp_path):
    """train --init, --tokenizer and pack --tokenizer/--detector take a packed checkpoint (e.g. a shipped one):
    its float16 weights come back as the init model's, and the re-packed checkpoint loads and steps."""
    import gymnasium as gym

    from hma_gym.checkpoint import load_tensors
    from hma_gym.world_model import load_dynamics

    model, meta = load_dynamics(tiny_checkpoint)
    packed = load_tensors(tiny_checkpoint / "dynamics.safetensors")
    assert meta["packed"] and meta["trained_steps"] == 40
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, packed[name].float()), name

    run = tmp_path / "ft"
    main(["train", "--data", str(tiny_data), "--tokenizer", str(tiny_checkpoint), "--out", str(run),
          "--init", str(tiny_checkpoint), "--steps", "4", "--eval-every", "4", "--save-every", "4", *DYN_ARGS])
    assert _log(run)[0]["config"]["init"] == str(tiny_checkpoint)
    tuned = load_tensors(run / "dynamics.safetensors")
    assert any(not torch.equal(tuned[k], packed[k].float()) for k in packed)  # it trained from there

    out = tmp_path / "repacked"
    main(["pack", "--out", str(out), "--tokenizer", str(tiny_checkpoint), "--dynamics", str(run),
          "--detector", str(tiny_checkpoint), "--data", str(tiny_data), "--bank-size", "3", "--greedy"])
    for name in ("tokenizer", "detector"):
        a, b = load_tensors(out / f"{name}.safetensors"), load_tensors(tiny_checkpoint / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    env = gym.make("HMA-RobomimicLift-v0", checkpoint=out)
    env.reset(seed=0)
    obs = env.step(env.action_space.sample())[0]
    assert env.unwrapped.sim.greedy and np.isfinite(obs["robot0_eef_pos"]).all()
    env.close()


@pytest.mark.slow
def test_select_layers_starts_a_shallower_model_from_chosen_blocks(dynamics_run, tiny_data, tokenizer_run,
                                                                    tmp_path):
    """keep_layers copies the chosen blocks (in the given order) and every non-block weight; `select-layers`
    writes that shallower model and the source's statistics as a run that `train --init` fine-tunes; bad
    layer lists are refused."""
    from hma_gym.checkpoint import load_tensors
    from hma_gym.world_model import load_dynamics
    from training.select_layers import keep_layers

    model, _ = load_dynamics(dynamics_run)
    assert model.config.n_layer == 2
    swapped = keep_layers(model, [1, 0])
    src, dst = model.state_dict(), swapped.state_dict()
    assert swapped.config.n_layer == 2 and dst.keys() == src.keys()
    for key, value in dst.items():
        if key.startswith("blocks."):
            i, rest = key[len("blocks."):].split(".", 1)
            key = f"blocks.{1 - int(i)}.{rest}"
        assert torch.equal(value, src[key]), key
    one = keep_layers(model, [1])
    assert one.config.n_layer == 1 and one.num_params() < model.num_params()
    for bad in ([], [0, 0], [2], [-1]):
        with pytest.raises(ValueError, match="layer"):
            keep_layers(model, bad)

    selected = tmp_path / "selected"
    main(["select-layers", "--source", str(dynamics_run), "--layers", "1", "--out", str(selected)])
    start, meta = load_dynamics(selected)
    assert start.config.n_layer == 1 and meta["selected_layers"]["layers"] == [1]
    assert start.state_dict().keys() == one.state_dict().keys()
    assert all(torch.equal(p, one.state_dict()[k]) for k, p in start.state_dict().items())
    norms, source_norms = (load_tensors(d / "normalization.safetensors") for d in (selected, dynamics_run))
    assert norms.keys() == source_norms.keys() and all(torch.equal(norms[k], source_norms[k]) for k in norms)

    run = tmp_path / "shallow"
    main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(run),
          "--init", str(selected), "--steps", "4", "--eval-every", "4", "--save-every", "4", *DYN_ARGS])
    tuned, meta = load_dynamics(run)
    assert tuned.config.n_layer == 1 and meta["init"]["dir"] == str(selected) and meta["init"]["mode"] == "full"
    assert any(not torch.equal(p, one.state_dict()[k]) for k, p in tuned.state_dict().items())  # it trained
    assert all(np.isfinite(r["loss"]) for r in _log(run) if r.get("event") == "train")
    with pytest.raises(CheckpointError, match="keeps its size"):  # --n-layer 2 is not the init model's depth
        main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "x"),
              "--init", str(selected), "--n-layer", "2", "--steps", "2", *DYN_ARGS])
    with pytest.raises(CheckpointError, match=r"2 blocks: layers must be distinct block indices in \[0, 1\]"):
        main(["select-layers", "--source", str(dynamics_run), "--layers", "0", "2", "--out", str(tmp_path / "y")])
    for bad in (["0", "0"], ["-1"]):
        with pytest.raises(SystemExit):
            main(["select-layers", "--source", str(dynamics_run), "--layers", *bad, "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):  # the surgery left `train`
        main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "x"),
              "--init", str(dynamics_run), "--init-layers", "0", "--steps", "2", *DYN_ARGS])


@pytest.mark.slow
def test_weights_hash_of_named_parts(tiny_checkpoint, tmp_path):
    import shutil

    from hma_gym.checkpoint import weights_hash

    shutil.copy(tiny_checkpoint / "tokenizer.safetensors", tmp_path)
    # names: only those files count, as if the directory held nothing else
    assert weights_hash(tiny_checkpoint, ("tokenizer",)) == weights_hash(tmp_path)
    assert weights_hash(tiny_checkpoint) != weights_hash(tmp_path)


@pytest.mark.slow
def test_tokenizer_levels_flag_sets_the_codebook(tiny_data, tmp_path):
    from training.train_tokenizer import TokenizerTrainConfig

    assert TokenizerTrainConfig(preset="tiny", image_size=16).model_config().levels == (4, 3)  # the preset's
    cfg = TokenizerTrainConfig(preset="tiny", image_size=16, levels=(5, 4, 3))
    assert cfg.model_config().levels == (5, 4, 3) and cfg.model_config().codebook_size == 60
    with pytest.raises(ValueError, match="levels"):
        TokenizerTrainConfig(preset="tiny", image_size=16, levels=(5, 1))
    out = tmp_path / "tok"
    main(["train-tokenizer", "--data", str(tiny_data), "--out", str(out), "--preset", "tiny", "--image-size", "16",
          "--levels", "5", "4", "3", "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--save-every", "2",
          "--eval-frames", "8", "--threads", "1", "--no-progress"])
    from hma_gym.world_model import load_tokenizer

    assert load_tokenizer(out).codebook_size == 60


@pytest.mark.slow
def test_tokenizer_psnr_benchmark_scores_every_held_out_frame(tiny_data, tokenizer_run, tmp_path, monkeypatch):
    import benchmarks.common as common
    from benchmarks.tokenizer_psnr import main as bench
    from hma_gym.checkpoint import weights_hash
    from hma_gym.metrics import psnr
    from hma_gym.world_model import load_tokenizer

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    row = bench(["--data", str(tiny_data), "--tokenizers", str(tokenizer_run), "--no-progress"])["rows"][0]
    frames = np.concatenate([e.frames for e in load_episodes(DataConfig(data=str(tiny_data), image_size=16), "valid")])
    tok = load_tokenizer(tokenizer_run)
    with torch.no_grad():
        by_hand = psnr(tok.decode_uint8(tok.encode(torch.from_numpy(frames))), frames)
    assert row["frames"] == len(frames) and row["codebook_size"] == 12
    assert row["psnr_mean"] == pytest.approx(float(by_hand.mean()), abs=1e-4)
    assert 0 < row["ssim_mean"] <= 1
    assert row["weights_hash"] == weights_hash(tokenizer_run)  # a run dir holds only the tokenizer's weights
    assert (tmp_path / "tokenizer_psnr.json").is_file()


def test_unpack_runs_joins_parts_and_names_the_weights(tmp_path):
    """scripts/unpack_runs.py: parallel_train's split tar back into run directories, fp16 weights renamed."""
    import io
    import tarfile

    from scripts.unpack_runs import unpack

    src = tmp_path / "src" / "d160"
    src.mkdir(parents=True)
    (src / "dynamics_fp16.safetensors").write_bytes(bytes(range(256)) * 160)
    (src / "dynamics.json").write_text('{"config": {}}')
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f"d160/{f.name}")
    data, parts = buf.getvalue(), tmp_path / "parts"
    parts.mkdir()
    for i in range(0, len(data), 4096):  # 11 parts: part10 must come after part9
        (parts / f"runs.tar.part{i // 4096}").write_bytes(data[i : i + 4096])
    assert len(list(parts.iterdir())) >= 11
    (run,) = unpack(parts, tmp_path / "runs")
    assert run == tmp_path / "runs" / "d160"
    assert (run / "dynamics.safetensors").read_bytes() == bytes(range(256)) * 160
    assert not (run / "dynamics_fp16.safetensors").exists()
    with pytest.raises(SystemExit, match="no runs.tar.part"):
        unpack(tmp_path / "src", tmp_path / "other")


@pytest.mark.slow
def test_factorized_model_starts_from_a_trained_trunk(dynamics_run, tiny_data, tokenizer_run, tmp_path):
    """train --factorized-head --init RUN --init-mode trunk: a model with per-FSQ-channel softmaxes whose
    trunk, stems, heads and statistics start as the source run's and whose image input/output start fresh;
    it trains and its checkpoint reloads with the factorised head. Mismatched trunks and other heads are
    refused."""
    from hma_gym.checkpoint import load_tensors
    from hma_gym.world_model import load_dynamics, load_tokenizer
    from training.warmstart import IMAGE_IO, copy_trunk

    source, _ = load_dynamics(dynamics_run)
    levels = load_tokenizer(tokenizer_run).cfg.levels
    run = tmp_path / "fact"
    main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(run),
          "--factorized-head", "--init", str(dynamics_run), "--init-mode", "trunk", "--steps", "4", "--eval-every", "4",
          "--save-every", "4", *DYN_ARGS, "--lr", "1e-9"])  # weights stay (almost) put
    model, meta = load_dynamics(run)
    assert model.config.code_levels == tuple(levels) and model.config.vocab_size == source.config.vocab_size
    assert model.image.proj.out_features == model.group * sum(levels)
    assert meta["init"]["mode"] == "trunk" and meta["init"]["dir"] == str(dynamics_run)
    assert meta["init"]["new_image_head"] == ["image.tok_emb.weight", "image.proj.weight", "image.proj.bias"]
    src = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(IMAGE_IO):
            torch.testing.assert_close(value, src[key], atol=1e-7, rtol=0, msg=key)
    norms = load_tensors(run / "normalization.safetensors")
    for key, value in load_tensors(dynamics_run / "normalization.safetensors").items():
        assert torch.equal(norms[key], value), key
    assert all(np.isfinite(r["loss"]) for r in _log(run) if r.get("event") == "train")

    from hma_gym.models.hma import make_hma

    wider = make_hma("tiny", d_model=48, vocab_size=source.config.vocab_size, grid=source.config.grid,
                     patch_size=2, max_frames=6, embodiments=source.config.embodiments)
    with pytest.raises(ValueError, match="more than the image head"):
        copy_trunk(wider, source)
    with pytest.raises(SystemExit):  # the factorised head is a maskgit head
        main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "x"),
              "--head", "mar", "--factorized-head", "--steps", "2", *DYN_ARGS])


@pytest.mark.parametrize("kwargs,match", [
    ({"init_mode": "layers"}, r"init_mode must be one of \('full', 'trunk'\)"),
    ({"trainable": "trunk"}, r"trainable must be one of \('all', 'new-embodiments', 'diffusion-head'\)"),
    ({"head": "soft"}, r"head must be one of \('maskgit', 'mar'\)"),
    ({"init_mode": "trunk"}, "--init-mode trunk needs --init"),
    ({"init": "run", "factorized_head": True}, "--init-mode full keeps the --init model's image head"),
    ({"init": "run", "head": "mar", "lattice_input": True}, "add --init-mode trunk"),
    ({"init": "run", "init_mode": "trunk", "head": "mar"}, "--init-mode trunk --head mar needs --lattice-input"),
    ({"trainable": "new-embodiments"}, "--trainable new-embodiments needs --init"),
    ({"init": "run", "init_mode": "trunk", "trainable": "new-embodiments"}, r"needs --init \(with --init-mode full"),
    ({"init": "run", "trainable": "diffusion-head"}, "needs --head mar and --init"),
    ({"head": "mar", "trainable": "diffusion-head"}, "needs --head mar and --init"),
    ({"head": "mar", "factorized_head": True}, "--factorized-head is a maskgit head"),
    ({"lattice_input": True}, "--lattice-input is an input of the mar head"),
])
def test_bad_start_and_freeze_combinations_are_refused(kwargs, match):
    from training.train_dynamics import DynamicsTrainConfig

    with pytest.raises(ValueError, match=match):
        DynamicsTrainConfig(**kwargs)


def test_start_and_freeze_flags_are_three():
    """`train` starts and freezes through --init, --init-mode and --trainable only; the combinations the
    recipes use are accepted."""
    from tests.test_readme import options_of
    from training.train_dynamics import DynamicsTrainConfig

    options = options_of("train")
    assert {"--init", "--init-mode", "--trainable"} <= options
    assert not {o for o in options if o.startswith(("--init-", "--train-only", "--freeze"))} - {"--init-mode"}
    DynamicsTrainConfig(init="run", init_mode="trunk", factorized_head=True)  # lift-15k-cpu
    DynamicsTrainConfig(init="run", init_mode="trunk", head="mar", lattice_input=True, trainable="diffusion-head")
    DynamicsTrainConfig(init="run", trainable="new-embodiments")


def test_model_defaults_are_hma_configs():
    """The trainer keeps no second copy of the model's defaults: a plain `train` builds HMAConfig's."""
    from hma_gym.models.hma import HMAConfig
    from training.train_dynamics import DynamicsTrainConfig

    cfg, model = DynamicsTrainConfig(), HMAConfig()
    for name in ("patch_size", "n_action_tokens", "max_frames", "objective_probs", "head", "diff_width",
                 "diff_depth", "diff_sample_steps", "diff_batch_mul"):
        assert getattr(cfg, name) == getattr(model, name), name


@pytest.mark.slow
def test_full_init_refuses_a_model_of_another_tokenizers_codes(dynamics_run, tiny_data, tmp_path):
    """--init-mode full keeps the image head, so the tokenizer must be the one the model predicts the codes of."""
    from hma_gym.envs.learned_env import ASSETS

    with pytest.raises(CheckpointError, match=r"15360 on 16x16: start a model on other codes with --init-mode trunk"):
        main(["train", "--data", str(tiny_data), "--tokenizer", str(ASSETS / "tokenizer_15k"), "--init",
              str(dynamics_run), "--out", str(tmp_path / "x"), "--steps", "2", *DYN_ARGS])
