"""Augmentation ops: shape, dtype, value range, determinism, identity at zero strength, the
config parser, composition order and eval. Each (op, parameters) pair is jitted once and cached,
so the whole file compiles about 25 small programs."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.data import augment
from cnnjax.errors import ConfigError, UnknownNameError

N, H, W, C, K = 8, 16, 16, 3, 10
KEY, OTHER_KEY = jax.random.key(0), jax.random.key(1)
MIXING = {"mixup", "cutmix"}

# Per op: parameters that visibly change a batch, and parameters that must be the identity.
STRONG = {
    "crop": {"pad": 4},
    "flip": {"p": 0.5},
    "translate": {"height_factor": 0.25, "width_factor": (-0.2, 0.1)},
    "rotate": {"factor": 0.1},
    "zoom": {"height_factor": 0.3},
    "contrast": {"factor": 0.5},
    "erase": {"p": 0.8, "scale": (0.1, 0.3)},
    "cutout": {},
    "mixup": {"alpha": 0.2},
    "cutmix": {"alpha": 1.0},
}
IDENTITY = {
    "crop": {"pad": 0},
    "flip": {"p": 0.0},
    "translate": {"height_factor": 0.0},
    "rotate": {"factor": 0.0},
    "zoom": {"height_factor": 0.0},
    "contrast": {"factor": 0.0},
    "erase": {"p": 0.0},
    "cutout": {"scale": (0.0, 0.0)},
    "mixup": {"alpha": 0.0},
    "cutmix": {"alpha": 0.0},
}


@functools.cache
def batch() -> dict:
    """Distinct, exactly representable, positive pixel values (so 0 marks fill), distinct
    neighbouring labels, and an extra entry that ops must pass through."""
    image = (1 + jnp.arange(N * H * W * C, dtype=jnp.float32)).reshape(N, H, W, C)
    return {"image": image, "label": jnp.arange(N, dtype=jnp.int32), "extra": jnp.ones(N)}


@functools.cache
def jitted(name: str, **params):
    """``op(key, batch)`` jitted once per parameter set."""
    extra = {"num_classes": K} if name in MIXING else {}
    return jax.jit(functools.partial(augment.AUGMENTATIONS[name], **params, **extra))


def apply(name: str, params: dict, key=KEY, inputs=None) -> dict:
    """The op's output as numpy arrays."""
    return jax.tree.map(np.asarray, jitted(name, **params)(key, inputs or batch()))


def window_offset(out, padded):
    """The (y0, x0) where ``out`` (H, W, C) is a window of ``padded``, or None."""
    for y0 in range(padded.shape[0] - H + 1):
        for x0 in range(padded.shape[1] - W + 1):
            if np.array_equal(padded[y0 : y0 + H, x0 : x0 + W], out):
                return y0, x0
    return None


def assert_box(mask):
    """``mask`` (H, W) is one filled axis-aligned rectangle (or empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    if rows.size:
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    np.testing.assert_array_equal(mask, box)


def test_every_op_is_tested_and_its_rules_match_its_signature():
    assert set(STRONG) == set(IDENTITY) == set(augment.AUGMENTATIONS)
    for name, fn in augment.AUGMENTATIONS.items():
        params = set(inspect.signature(fn).parameters) - {"key", "batch", "num_classes"}
        assert set(augment._RULES[name]) == params, name


@pytest.mark.parametrize("name", STRONG)
def test_op_contract(name):
    """Shape, dtype, pass-through, determinism for a key, change with another key, under jit."""
    out = apply(name, STRONG[name])
    assert out["image"].shape == (N, H, W, C) and out["image"].dtype == np.float32
    assert np.isfinite(out["image"]).all()
    np.testing.assert_array_equal(out["extra"], np.ones(N))
    if name in MIXING:
        assert out["label"].shape == (N, K) and out["label"].dtype == np.float32
        np.testing.assert_allclose(out["label"].sum(1), 1, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out["label"], np.arange(N))
    again, other = apply(name, STRONG[name]), apply(name, STRONG[name], OTHER_KEY)
    np.testing.assert_array_equal(out["image"], again["image"])
    assert not np.array_equal(out["image"], other["image"])
    assert not np.array_equal(out["image"], batch()["image"])


@pytest.mark.parametrize("name", IDENTITY)
def test_zero_strength_is_identity(name):
    out = apply(name, IDENTITY[name])
    np.testing.assert_array_equal(out["image"], batch()["image"])
    labels = np.eye(K)[np.arange(N)] if name in MIXING else np.arange(N)
    np.testing.assert_array_equal(out["label"], labels)


def test_every_op_keeps_bfloat16():
    x = {**batch(), "image": batch()["image"].astype(jnp.bfloat16)}
    for name, params in STRONG.items():
        extra = {"num_classes": K} if name in MIXING else {}
        shape = jax.eval_shape(
            functools.partial(augment.AUGMENTATIONS[name], **params, **extra), KEY, x
        )
        assert shape["image"].dtype == jnp.bfloat16 and shape["image"].shape == (N, H, W, C), name


def test_flip_mirrors_some_examples_and_keeps_the_others():
    x, out = np.asarray(batch()["image"]), apply("flip", STRONG["flip"])["image"]
    flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x, strict=True)]
    kept = [np.array_equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


@pytest.mark.parametrize("mode,np_mode", [("zero", "constant"), ("reflect", "reflect")])
def test_crop_is_a_window_of_the_padded_image(mode, np_mode):
    x, pad = np.asarray(batch()["image"]), 4
    out = apply("crop", {"pad": pad, "mode": mode})["image"]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    offsets = [window_offset(o, p) for o, p in zip(out, padded, strict=True)]
    assert None not in offsets
    assert len(set(offsets)) > 1


def test_translate_shifts_by_whole_pixels_within_the_factors():
    x, pad = np.asarray(batch()["image"]), 4
    out = apply("translate", STRONG["translate"])["image"]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for o, p in zip(out, padded, strict=True):
        y0, x0 = window_offset(o, p)
        dy, dx = pad - y0, pad - x0  # content moved down by dy, right by dx
        assert -4 <= dy <= 4 and -3 <= dx <= 2  # 0.25 * 16; round(-0.2 * 16), round(0.1 * 16)


@pytest.mark.parametrize("name", ["rotate", "zoom"])
def test_resampling_stays_between_zero_and_the_input_range(name):
    x, out = np.asarray(batch()["image"]), apply(name, STRONG[name])["image"]
    for o, xi in zip(out, x, strict=True):
        assert min(0, xi.min()) - 1e-3 <= o.min() and o.max() <= xi.max() + 1e-3


def test_rotate_quarter_turn_is_rot90_counter_clockwise():
    out = apply("rotate", {"factor": (0.25, 0.25)})["image"]
    expected = np.rot90(np.asarray(batch()["image"]), 1, axes=(1, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_zoom_in_on_rows_and_out_on_columns():
    flat = {**batch(), "image": jnp.full((N, H, W, C), 2.0)}
    out = apply("zoom", {"height_factor": (-0.5, -0.5), "width_factor": (0.5, 0.5)}, inputs=flat)
    image = out["image"]
    np.testing.assert_array_equal(image[:, :, [0, -1]], 0)  # zoomed out: outside is fill
    np.testing.assert_allclose(image[:, :, 5:11], 2.0, rtol=1e-6)  # zoomed in: all inside
    np.testing.assert_array_equal(image, image[:, :1].repeat(H, 1))


def test_contrast_scales_deviations_from_each_channel_mean():
    x, f = np.asarray(batch()["image"]), STRONG["contrast"]["factor"]
    out = apply("contrast", STRONG["contrast"])["image"]
    mean = x.mean((1, 2), keepdims=True)
    np.testing.assert_allclose(out.mean((1, 2), keepdims=True), mean, rtol=1e-5)
    scale = ((out - mean) / (x - mean)).reshape(N, H * W, C)
    np.testing.assert_allclose(scale, scale[:, :1].repeat(H * W, 1), rtol=1e-3)
    assert (1 - f <= scale).all() and (scale <= 1 + f).all()
    assert np.unique(scale[:, 0].round(4)).size == N * C


@pytest.mark.parametrize("name", ["erase", "cutout"])
def test_erase_zeroes_one_box(name):
    x, out = np.asarray(batch()["image"]), apply(name, STRONG[name])["image"]
    erased = out == 0
    assert ((out == x) | erased).all() and (erased == erased[..., :1]).all()
    for mask in erased[..., 0]:
        assert_box(mask)
    area = erased[..., 0].mean((1, 2))
    high = 0.25 if name == "cutout" else 0.3
    assert area.max() <= high + 0.05 and (area > 0).sum() >= N // 2


def test_mixup_mixes_images_and_labels_with_the_same_lam():
    x, out = np.asarray(batch()["image"]), apply("mixup", STRONG["mixup"])
    own, partner = np.eye(K)[np.arange(N)], np.eye(K)[np.roll(np.arange(N), 1)]
    lam = out["label"][np.arange(N), np.arange(N)]
    np.testing.assert_allclose(out["label"], lam[:, None] * own + (1 - lam[:, None]) * partner)
    w = lam[:, None, None, None]
    np.testing.assert_allclose(out["image"], w * x + (1 - w) * np.roll(x, 1, 0), rtol=1e-5)
    assert ((lam >= 0) & (lam <= 1)).all() and np.unique(lam).size == N


def test_cutmix_label_weights_are_the_exact_pasted_area():
    x, out = np.asarray(batch()["image"]), apply("cutmix", STRONG["cutmix"])
    pasted = (out["image"] != x).all(-1)
    np.testing.assert_array_equal(out["image"][pasted], np.roll(x, 1, 0)[pasted])
    for mask in pasted:
        assert_box(mask)
    area = pasted.mean((1, 2))
    own, partner = np.eye(K)[np.arange(N)], np.eye(K)[np.roll(np.arange(N), 1)]
    expected = (1 - area[:, None]) * own + area[:, None] * partner
    np.testing.assert_allclose(out["label"], expected, rtol=1e-6, atol=1e-7)
    assert np.unique(area).size > N // 2  # boxes of many sizes


def test_cutmix_mixes_soft_labels_from_mixup():
    mixed = jitted("mixup", **STRONG["mixup"])(KEY, batch())
    out = apply("cutmix", STRONG["cutmix"], OTHER_KEY, inputs=mixed)
    soft, x = np.asarray(mixed["label"]), np.asarray(mixed["image"])
    area = (out["image"] != x).all(-1).mean((1, 2))[:, None]
    expected = (1 - area) * soft + area * np.roll(soft, 1, 0)
    np.testing.assert_allclose(out["label"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["label"].sum(1), 1, rtol=1e-6)


def test_build_applies_ops_in_order_with_folded_keys():
    spec = "flip,mixup(alpha=0.2)"
    assert augment.parse(spec) == [("flip", {}), ("mixup", {"alpha": 0.2})]
    out = jax.jit(augment.build(spec, K))(KEY, batch())
    flip, mixup = jitted("flip", p=0.5), jitted("mixup", alpha=0.2)
    k0, k1 = jax.random.fold_in(KEY, 0), jax.random.fold_in(KEY, 1)
    in_order, reversed_ = mixup(k1, flip(k0, batch())), flip(k0, mixup(k1, batch()))
    for key in ("image", "label"):
        np.testing.assert_allclose(out[key], in_order[key], rtol=1e-6)
    assert not np.allclose(out["image"], reversed_["image"])


def test_eval_and_empty_spec_return_the_batch_unchanged():
    b = batch()
    assert augment.build("crop(pad=4),flip,cutmix", K)(KEY, b, train=False) is b
    assert augment.build("", K)(KEY, b) is b
    assert augment.parse("  ") == []


def test_parse_reads_numbers_pairs_words_and_spaces():
    spec = " crop(pad=4, mode=reflect) , zoom(height_factor=(-0.3, -0.2), width_factor=None),flip"
    assert augment.parse(spec) == [
        ("crop", {"pad": 4, "mode": "reflect"}),
        ("zoom", {"height_factor": (-0.3, -0.2), "width_factor": None}),
        ("flip", {}),
    ]
    assert isinstance(augment.parse("crop(pad=4)")[0][1]["pad"], int)
    assert augment.parse("erase(scale=[0.1, 0.2])") == [("erase", {"scale": (0.1, 0.2)})]


def test_unknown_op_lists_the_valid_names():
    with pytest.raises(UnknownNameError, match="unknown augmentation 'blur'.*crop.*mixup"):
        augment.parse("crop,blur")
    assert issubclass(UnknownNameError, ValueError)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("crop(pad=-1)", "pad=-1 must be an integer >= 0"),
        ("crop(pad=1.5)", "must be an integer"),
        ("crop(mode=wrap)", "one of zero, reflect"),
        ("crop(size=4)", "no parameter 'size'; valid: pad, mode"),
        ("flip(p=1.5)", r"in \[0, 1\]"),
        ("erase(scale=(0.5, 0.1))", "low <= high"),
        ("mixup(alpha=-1)", "alpha=-1"),
        ("mixup(num_classes=3)", "no parameter"),
        ("crop(4)", "name.param=value"),
        ("crop(pad=4", "never closed"),
        ("crop(pad=4, pad=2)", "repeated"),
        ("crop(pad=x + 1)", "not a literal"),
    ],
)
def test_bad_parameters_raise_a_one_line_config_error(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        augment.parse(spec)
    assert "\n" not in str(info.value)
