"""Unit tests of the FSQ image tokenizer, on a tiny config (16x16 images, 4x4 grid)."""

import json

import pytest
import torch

from hma_gym.models.tokenizer import (
    ImageTokenizer,
    TokenizerConfig,
    fsq_codes_to_index,
    index_to_codes,
    tokenizer_presets,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine threads spin-wait for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw) -> TokenizerConfig:
    return TokenizerConfig(**{**tokenizer_presets["tiny"]().to_dict(), **kw})


def squares(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Coloured squares on white, uint8 (n, size, size, 3)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, size, size, 3), 255, dtype=torch.uint8)
    for i in range(n):
        side = int(torch.randint(3, size // 2, (1,), generator=g))
        y, x = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, y : y + side, x : x + side] = torch.randint(0, 200, (3,), generator=g, dtype=torch.uint8)
    return images


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 3), (2,), (7, 2, 6)])
def test_code_index_round_trip_covers_codebook(levels):
    n = 1
    for v in levels:
        n *= v
    index = torch.arange(n)
    digits = index_to_codes(index, levels)  # (n, C)
    assert digits.shape == (n, len(levels))
    for i, v in enumerate(levels):
        assert digits[:, i].min() == 0 and digits[:, i].max() == v - 1
    assert torch.equal(fsq_codes_to_index(digits, levels), index)
    assert len({tuple(d) for d in digits.tolist()}) == n  # a bijection


def test_quantized_latents_round_trip_through_ids():
    torch.manual_seed(0)
    model = ImageTokenizer(TokenizerConfig(image_size=8, grid=4, levels=(8, 5, 5, 5), channels=(4,)))
    latent = torch.randn(3, 4, 4, 4) * 5
    bounded = model.bound(latent)
    assert model.bound(torch.zeros(1, 4, 1, 1)).abs().max() < 1e-6  # zero stays zero, odd or even L
    q, codes = model.quantize(bounded)
    assert codes.min() >= 0 and codes.max() < model.codebook_size
    assert torch.equal(model.codes_to_latent(codes), q)
    all_codes = torch.arange(model.codebook_size).view(-1, 1, 1)  # every id, as (N, 1, 1) "grids"
    q_all = model.codes_to_latent(all_codes)
    assert torch.equal(model.quantize(q_all)[1], all_codes)


@pytest.mark.parametrize("as_float", [False, True])
def test_encode_decode_shapes_and_dtypes(as_float):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ImageTokenizer(cfg)
    images = squares(2)
    inputs = images.permute(0, 3, 1, 2).float() / 255 if as_float else images
    codes = model.encode(inputs)
    assert codes.shape == (2, cfg.grid, cfg.grid) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < model.codebook_size == 12
    out = model.decode(codes)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    u8 = model.decode_uint8(codes)
    assert u8.shape == (2, 16, 16, 3) and u8.dtype == torch.uint8
    latent = model.encode_latent(inputs)
    assert latent.shape == (2, len(cfg.levels), cfg.grid, cfg.grid)
    half = torch.tensor(cfg.levels) / 2
    assert (latent.abs() <= half.view(1, -1, 1, 1) + 1e-2).all()
    assert torch.equal(model.quantize(latent)[1], codes)
    assert model.num_params() > 0


def test_uint8_and_float_inputs_agree():
    model = ImageTokenizer(tiny_config())
    images = squares(2)
    as_float = images.permute(0, 3, 1, 2).float() / 255
    assert torch.equal(model.encode(images), model.encode(as_float))
    assert torch.equal(model.encode(images.numpy()), model.encode(images))
    flipped = images.numpy()[:, ::-1]  # an upside-down render flipped upright: a negative-stride view
    assert torch.equal(model.encode(flipped), model.encode(images.flip(1)))


def test_bfloat16_weights_and_autocast():
    model = ImageTokenizer(tiny_config())
    images = squares(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.encode(images)
        _, losses = model(images, prev_images=images)
    assert torch.isfinite(losses["loss"])
    assert model.encode_latent(images).dtype == torch.float32  # FSQ rounding stays in float32
    model = model.to(torch.bfloat16)
    assert model.encode(images).shape == codes.shape
    assert model.decode_uint8(codes).dtype == torch.uint8


def test_bad_image_shape_raises():
    model = ImageTokenizer(tiny_config())
    with pytest.raises(ValueError, match="uint8 images"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float images"):
        model.encode(torch.zeros(1, 16, 16, 3))


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ImageTokenizer(tiny_config())
    images = squares(8)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(20):
        _, losses = model(images)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = losses["loss"].item() if first is None else first
    _, losses = model(images)
    assert losses["loss"].item() < 0.7 * first
    assert set(losses) >= {"loss", "l1", "mse", "psnr"}


def test_temporal_term():
    torch.manual_seed(0)
    model = ImageTokenizer(tiny_config())
    prev = squares(4, seed=1)
    images = prev.clone()
    images[:, :4, :4] = 0  # one corner cell changes, the rest is pixel-identical
    recon, losses = model(images, prev_images=prev)
    assert recon.shape == (4, 3, 16, 16)
    for key in ("loss", "temporal", "token_stability", "token_stability_static"):
        assert torch.isfinite(losses[key]), key
    assert 0 <= losses["token_stability"].item() <= 1
    assert losses["temporal"].item() >= 0
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # identical frames: nothing to penalise, every token kept
    _, same = model(prev, prev_images=prev)
    assert same["temporal"].item() == 0 and same["token_stability"].item() == 1

    # the weight only scales the term into "loss"
    off = ImageTokenizer(tiny_config(temporal_weight=0.0))
    off.load_state_dict(model.state_dict())
    _, l_off = off(images, prev_images=prev)
    _, l_on = model(images, prev_images=prev)
    assert torch.allclose(l_off["loss"], l_off["l1"])
    expected = l_on["l1"] + model.cfg.temporal_weight * l_on["temporal"]
    assert torch.allclose(l_on["loss"], expected)


def test_config_round_trip():
    cfg = TokenizerConfig(channels=(16, 32), levels=(5, 5, 5), temporal_weight=0.1, norm="group")
    back = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    for make in tokenizer_presets.values():
        assert TokenizerConfig.from_dict(make().to_dict()) == make()


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"grid": 24}, "grid"),
        ({"grid": 64}, "image_size / grid"),
        ({"image_size": 48, "grid": 16}, "image_size / grid"),
        ({"levels": (8, 1)}, "levels"),
        ({"levels": ()}, "levels"),
        ({"channels": (32,)}, "channels"),
        ({"n_res_blocks": -1}, "n_res_blocks"),
        ({"norm": "batch"}, "norm"),
        ({"temporal_weight": -0.1}, "temporal_weight"),
        ({"temporal_sharpness": float("nan")}, "temporal_sharpness"),
    ],
)
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        TokenizerConfig(**kw)


def test_three_stage_config():
    cfg = TokenizerConfig(image_size=32, grid=4, levels=(3, 3), channels=(4, 4, 8))
    assert cfg.n_stages == 3
    assert ImageTokenizer(cfg).encode(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 4, 4)


def test_unknown_field_raises():
    with pytest.raises(ValueError, match="bogus"):
        TokenizerConfig.from_dict({"bogus": 1})
