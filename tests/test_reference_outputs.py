"""The shipped world models give the frames they gave when tests/data/reference_*.safetensors was made.

The references were saved by tests/make_reference_outputs.py before the model code was reorganised (issue 27):
greedy and seeded frames through the learned env's path. Codes must be equal; mar latents and predicted
states (floats) within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from hma_gym.checkpoint import load_tensors
from tests.make_reference_outputs import ASSETS, CHECKPOINTS, reference_outputs, reference_path


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_shipped_checkpoint_gives_the_reference_outputs(name: str) -> None:
    expected = load_tensors(reference_path(name))
    got = reference_outputs(ASSETS / name)
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        if want.is_floating_point():
            torch.testing.assert_close(got[key], want, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{name} {k}: {m}")
        else:
            diff = (got[key] != want).sum().item()
            assert diff == 0, f"{name} {key}: {diff} of {want.numel()} codes differ from the reference"
