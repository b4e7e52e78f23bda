"""Collecting with a policy, training on several files, and the token cache (`hma-gym tokenize`)."""

import json

import numpy as np
import pytest

from hma_gym.cli import main
from hma_gym.data.hdf5 import list_demos, read_env_args
from tests.conftest import DYN_ARGS, read_log
from training.data import DataConfig, load_episodes
from training.token_cache import TokenCacheError, load_token_cache

# every test here collects episodes or uses the tiny pipeline of conftest.py
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def random_policy_data(tmp_path_factory):
    """3 GT episodes of the random policy (all failures), appended after the expert's file layout."""
    path = tmp_path_factory.mktemp("data") / "random16.hdf5"
    main(["collect", "--policy", "random", "--out", str(path), "--episodes", "3", "--image-size", "16",
          "--seed", "500", "--valid-every", "3", "--no-progress"])
    return path


def test_collect_records_another_policy(random_policy_data):
    assert read_env_args(random_policy_data)["collector"] == "random"
    assert "expert" not in read_env_args(random_policy_data)
    assert len(list_demos(random_policy_data, "train")) == 2 and len(list_demos(random_policy_data, "valid")) == 1


def test_extra_data_joins_each_split(tiny_data, random_policy_data):
    base = DataConfig(data=str(tiny_data), image_size=16)
    both = DataConfig(data=str(tiny_data), extra_data=(str(random_policy_data),), image_size=16)
    for split, extra in (("train", 2), ("valid", 1)):
        a, b = load_episodes(base, split), load_episodes(both, split)
        assert len(b) == len(a) + extra
        assert [e.name for e in b[: len(a)]] == [e.name for e in a]
        assert all(e.name.startswith(f"{random_policy_data}:demo_") for e in b[len(a):])


def test_token_cache_round_trip_and_training_from_it(tiny_data, random_policy_data, tokenizer_run, tmp_path):
    cache = tmp_path / "tokens.safetensors"
    main(["tokenize", "--data", str(tiny_data), "--extra-data", str(random_policy_data), "--tokenizer",
          str(tokenizer_run), "--out", str(cache), "--no-progress", "--threads", "1"])
    splits, meta = load_token_cache(cache)
    assert meta["data"]["extra_data"] == [str(random_policy_data)]
    data = DataConfig(data=str(tiny_data), extra_data=(str(random_policy_data),), image_size=16)
    from hma_gym.world_model import load_tokenizer
    from training.fidelity import tokenize_episodes

    tok = load_tokenizer(tokenizer_run)
    for split in ("train", "valid"):
        fresh = load_episodes(data, split)
        tokenize_episodes(tok, fresh)
        cached = splits[split]
        assert [e.name for e in cached] == [e.name for e in fresh]
        for c, f in zip(cached, fresh, strict=True):
            np.testing.assert_array_equal(c.tokens, f.tokens)
            np.testing.assert_array_equal(c.actions, f.actions)
            np.testing.assert_array_equal(c.states, f.states)
            np.testing.assert_array_equal(c.success, f.success)
            if split == "valid":
                np.testing.assert_array_equal(c.frames, f.frames)  # held-out frames kept for evaluation
            else:
                assert c.frames.size == 0

    # train from the cache: the main file only, then with the extra file too
    counts = {}
    for name, extra in (("main", []), ("both", ["--extra-data", str(random_policy_data)])):
        out = tmp_path / name
        main(["train", "--tokens", str(cache), "--data", str(tiny_data), *extra, "--tokenizer", str(tokenizer_run),
              "--out", str(out), "--steps", "4", "--eval-every", "4", "--save-every", "4", *DYN_ARGS])
        meta_out = json.loads((out / "dynamics.json").read_text())
        assert meta_out["config"]["tokens"] == str(cache)
        assert any(r["event"] == "eval" for r in read_log(out))
        assert meta_out["config"]["extra_data"] == extra[1:]
        counts[name] = read_log(out)[0]["config"]["train_episodes"]
    assert counts["both"] == counts["main"] + 2


def test_token_cache_refuses_another_tokenizer_or_file(tiny_data, tokenizer_run, tmp_path):
    cache = tmp_path / "tokens.safetensors"
    main(["tokenize", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(cache),
          "--max-valid-episodes", "1", "--no-progress", "--threads", "1"])
    assert len(load_token_cache(cache)[0]["valid"]) == 1
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    for f in tokenizer_run.glob("tokenizer.*"):
        (other / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "tokenizer.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()},
              str(other / "tokenizer.safetensors"))
    with pytest.raises(TokenCacheError, match="another tokenizer"):
        main(["train", "--tokens", str(cache), "--data", str(tiny_data), "--tokenizer", str(other),
              "--out", str(tmp_path / "x"), "--steps", "2", *DYN_ARGS])
    with pytest.raises(TokenCacheError, match="holds no episodes"):
        main(["train", "--tokens", str(cache), "--data", str(tiny_data), "--extra-data", "data/none.hdf5",
              "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "y"), "--steps", "2", *DYN_ARGS])
    with pytest.raises(TokenCacheError, match="no token cache"):
        load_token_cache(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(TokenCacheError, match="not a token cache"):
        load_token_cache(tmp_path / "junk.safetensors")
