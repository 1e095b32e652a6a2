"""The model zoo: exact parameter counts, output shapes, one training step per family, and
train/eval behaviour of BatchNorm, dropout and stochastic depth.

Big models are only traced (``jax.eval_shape``), never initialised; the training steps run narrow
variants of each family so the suite stays fast on CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import models
from cnnjax.models.common import drop_path
from cnnjax.models.convnext import ConvNeXtBlock
from cnnjax.models.efficientnet import MBConv
from cnnjax.nn.layers import batch_norm
from cnnjax.nn.pooling import adaptive_avg_pool, ceil_pool_padding

# torchvision 0.28's counts at 224x224x3 and 1000 classes (sum of p.numel() over
# torchvision.models.<name>(weights=None).parameters(); googlenet with aux_logits=False).
IMAGENET_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "mobilenet_v2": 3_504_872,
    "googlenet": 6_624_904,
    "densenet121": 7_978_856,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
}


def cifar_resnet_count(depth: int) -> int:
    """He et al.'s CIFAR ResNet (depth 6n + 2, widths 16/32/64, bias-free 3x3 convs each followed
    by BatchNorm's scale and bias, option-A shortcuts without parameters, a 10-way head):
    stem 3*3*3*16 + 2*16 = 464; per stage, n blocks of two convs with BN, the first reading the
    previous width; head 64*10 + 10. Sums to 97,216 n - 21,926."""
    n = (depth - 2) // 6
    conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout
    total = conv_bn(3, 16) + 64 * 10 + 10
    for cin, c in ((16, 16), (16, 32), (32, 64)):
        total += conv_bn(cin, c) + conv_bn(c, c) + (n - 1) * 2 * conv_bn(c, c)
    return total


# (name, input (H, W, C), classes, count).
SMALL_COUNTS = [
    # Published: resnet20 0.27M, resnet32 0.46M, resnet44 0.66M, resnet56 0.85M, resnet110 1.7M.
    ("resnet20", (32, 32, 3), 10, 269_722),
    ("resnet32", (32, 32, 3), 10, 464_154),
    ("resnet44", (32, 32, 3), 10, 658_586),
    ("resnet56", (32, 32, 3), 10, 853_018),
    ("resnet110", (32, 32, 3), 10, 1_727_962),
    # conv1 3*3*1*32 + 32, conv2 3*3*32*64 + 64 (no BatchNorm), fc1 7*7*64*128 + 128, head 1,290.
    ("simple_cnn", (28, 28, 1), 10, 320 + 18_496 + 401_536 + 1_290),
    # Bias-free convs with BN (9*cin*cout + 2*cout) at widths 32, 64, 128: 352 + 9,280 + 18,560
    # + 36,992 + 73,984 + 147,712; 28 -> 14 -> 7 -> 3 px, so fc1 3*3*128*256 + BN 512 = 295,424;
    # head 256*10 + 10.
    ("cifar_cnn", (28, 28, 1), 10, 286_880 + 295_424 + 2_570),
    # stem 9*3*24 + 48, convs 9*24*48 + 96 and 9*48*96 + 192, head 96*10 + 10.
    ("fast_cnn", (32, 32, 3), 10, 696 + 10_464 + 41_664 + 970),
    ("lenet5", (32, 32, 1), 10, 61_706),
    ("lenet5", (28, 28, 1), 10, 61_706),  # SAME first conv keeps the 5x5x16 flatten
    ("wrn28_10", (32, 32, 3), 10, 36_479_194),  # the reference PyTorch WideResNet's count
    ("keras_cifar_cnn", (32, 32, 3), 10, 356_810),
    ("torch_small_cnn", (28, 28, 1), 10, 50_282),
    ("example_cnn", (28, 28, 1), 10, 20_490),
]

SMALL_INPUT_MODELS = [
    "alexnet",
    "vgg11",
    "vgg11_bn",
    "googlenet",
    "densenet121",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
]
SMALL_MODELS = ["lenet5", "wrn28_10", "keras_cifar_cnn", "torch_small_cnn", "example_cnn"]


def _abstract(model, shape, batch=1):
    """(logits, variables) as ShapeDtypeStructs: a trace, no allocation."""
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)


def _size(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_param_counts_match_torchvision(name):
    logits, variables = _abstract(models.get(name, num_classes=1000), (224, 224, 3))
    assert _size(variables["params"]) == IMAGENET_COUNTS[name]
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name,shape,classes,count", SMALL_COUNTS)
def test_small_model_param_counts(name, shape, classes, count):
    logits, variables = _abstract(models.get(name, num_classes=classes), shape)
    assert _size(variables["params"]) == count
    assert logits.shape == (1, classes)


def test_every_registered_model_has_its_count_checked():
    """The two count tests build every registered model at least once; a newly registered model
    fails here until its count is asserted."""
    assert set(IMAGENET_COUNTS) | {name for name, *_ in SMALL_COUNTS} == set(models.names())


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_counts_follow_the_architecture(depth):
    counts = {name: count for name, _, _, count in SMALL_COUNTS}
    n = (depth - 2) // 6
    assert counts[f"resnet{depth}"] == cifar_resnet_count(depth) == 97_216 * n - 21_926


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", SMALL_INPUT_MODELS + SMALL_MODELS)
def test_output_shapes_on_small_images(name, size):
    """28 and 32 px both work; bfloat16 compute keeps float32 params and logits."""
    kwargs = {"small_input": True} if name in SMALL_INPUT_MODELS else {}
    channels = 1 if name in ("lenet5", "torch_small_cnn", "example_cnn") else 3
    dtype = jnp.bfloat16 if size == 32 else jnp.float32
    model = models.get(name, num_classes=7, dtype=dtype, **kwargs)
    logits, variables = _abstract(model, (size, size, channels), batch=2)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}


def test_googlenet_keeps_torchvisions_3x3_in_the_5x5_branch():
    _, variables = _abstract(models.get("googlenet", num_classes=10, small_input=True), (32, 32, 3))
    assert variables["params"]["inception3a"]["branch3"]["conv"]["kernel"].shape == (3, 3, 16, 32)


@pytest.mark.parametrize(
    "name,block,first,last",
    [
        # torchvision: rate * block_index / num_blocks for EfficientNet (16 blocks) ...
        ("efficientnet_b0", MBConv, "stage1_block1", ("stage7_block1", 0.2 * 15 / 16)),
        # ... and rate * block_index / (num_blocks - 1) for ConvNeXt (18 blocks).
        ("convnext_tiny", ConvNeXtBlock, "stage1_block1", ("stage4_block3", 0.1)),
    ],
)
def test_stochastic_depth_grows_linearly_per_block(name, block, first, last):
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, block) and context.method_name == "__call__":
            rates[context.module.name] = context.module.drop_path
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _abstract(models.get(name, num_classes=10, small_input=True), (32, 32, 3))
    assert rates[first] == 0.0
    assert rates[last[0]] == pytest.approx(last[1])
    assert list(rates.values()) == sorted(rates.values())


@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn"])
@pytest.mark.parametrize("size", [64, 100])
def test_adaptive_pool_keeps_the_classifier_at_other_sizes(name, size):
    logits, variables = _abstract(models.get(name, num_classes=1000), (size, size, 3))
    assert logits.shape == (1, 1000)
    assert _size(variables["params"]) == IMAGENET_COUNTS[name]


# -- narrow variants for real compute --------------------------------------------------------

_G = (8, 4, 8, 4, 8, 8)
# (name, kwargs, input (H, W, C), random: dropout or stochastic depth active in training).
TRAIN_CASES = [
    ("lenet5", {}, (32, 32, 1), False),
    (
        "alexnet",
        {"small_input": True, "widths": (8,) * 5, "classifier_width": 16},
        (32, 32, 3),
        True,
    ),
    (
        "vgg11_bn",
        {"small_input": True, "stages": ((8,), (16,), (16, 16)), "classifier_width": 16},
        (28, 28, 3),
        True,
    ),
    (
        "googlenet",
        {
            "small_input": True,
            "stem_widths": (8, 8, 16),
            "inceptions": (("i3", *_G), None, ("i4", *_G), None),  # both pool kinds
        },
        (32, 32, 3),
        True,
    ),
    (
        "densenet121",
        {
            "small_input": True,
            "growth_rate": 4,
            "block_config": (2, 2),
            "num_init_features": 8,
            "drop_rate": 0.2,
        },
        (32, 32, 3),
        True,
    ),
    (
        "mobilenet_v2",
        {"small_input": True, "width_mult": 0.25, "settings": ((1, 16, 1, 1), (6, 24, 2, 2))},
        (32, 32, 3),
        True,
    ),
    (
        "efficientnet_b0",
        {
            "small_input": True,
            "width_mult": 0.25,
            "stages": ((1, 3, 1, 16, 1), (6, 5, 2, 24, 2)),
            "stochastic_depth": 0.5,
            "dropout": 0.0,
        },
        (32, 32, 3),
        True,
    ),
    (
        "convnext_tiny",
        {"small_input": True, "depths": (1, 2), "dims": (8, 16), "stochastic_depth": 0.5},
        (32, 32, 3),
        True,
    ),
    ("wrn28_10", {"depth": 10, "widen_factor": 1, "dropout": 0.3}, (32, 32, 3), True),
    ("keras_cifar_cnn", {}, (32, 32, 3), False),
    ("torch_small_cnn", {}, (28, 28, 1), True),
    ("example_cnn", {}, (28, 28, 1), False),
]


def _make_train_step(model, tx):
    """Plain SGD step on cross-entropy; BatchNorm statistics come back as aux."""

    @jax.jit
    def step(variables, opt_state, x, y, key):
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, **rest},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        deltas, opt_state = tx.update(grads, opt_state, params)
        new = {**rest, **updates, "params": optax.apply_updates(params, deltas)}
        return new, opt_state, loss

    return step


def _trees_equal(a, b) -> bool:
    """Leafwise equality on the host (eager jnp ops would compile one kernel per leaf shape)."""
    a, b = jax.device_get((a, b))
    return all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow  # 5-40 s per model on 2 busy cores: mostly compiling the train step
@pytest.mark.parametrize("name,kwargs,shape,random", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_step_and_train_eval_behaviour(name, kwargs, shape, random):
    model = models.get(name, num_classes=5, **kwargs)
    x = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
    y = np.arange(4) % 5
    k1, k2 = jax.random.key(1), jax.random.key(2)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    tx = optax.sgd(0.05)
    step = _make_train_step(model, tx)
    opt_state = tx.init(variables["params"])

    new, _, loss = step(variables, opt_state, x, y, k1)
    _, _, loss_other_key = step(variables, opt_state, x, y, k2)
    assert np.isfinite(float(loss))
    assert not _trees_equal(new["params"], variables["params"])
    # Dropout / stochastic depth draw from the "dropout" rng in training only.
    assert (float(loss) != float(loss_other_key)) == random
    if "batch_stats" in variables:
        assert not _trees_equal(new["batch_stats"], variables["batch_stats"])

    @jax.jit
    def evaluate(variables, key):
        return model.apply(
            variables, x, train=False, mutable=["batch_stats"], rngs={"dropout": key}
        )

    out1, stats1 = evaluate(new, k1)
    out2, _ = evaluate(new, k2)
    assert out1.shape == (4, 5) and out1.dtype == jnp.float32
    np.testing.assert_array_equal(out1, out2)  # eval is deterministic
    if "batch_stats" in new:
        assert _trees_equal(stats1["batch_stats"], new["batch_stats"])  # eval leaves stats fixed


# -- shared pieces -------------------------------------------------------------------------


def _torch_adaptive_avg_pool(x, oh, ow):
    """Reference with torch's window rule, one output pixel at a time."""
    n, h, w, c = x.shape
    out = np.zeros((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            h0, h1 = i * h // oh, -(-(i + 1) * h // oh)
            w0, w1 = j * w // ow, -(-(j + 1) * w // ow)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("hw,out", [((7, 7), 7), ((6, 9), 3), ((5, 7), (3, 2)), ((1, 2), 7)])
def test_adaptive_avg_pool_matches_torch_windows(hw, out):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    oh, ow = (out, out) if isinstance(out, int) else out
    np.testing.assert_allclose(
        adaptive_avg_pool(jnp.asarray(x), out), _torch_adaptive_avg_pool(x, oh, ow), atol=1e-6
    )


@pytest.mark.parametrize("size", range(3, 16))
def test_ceil_pool_padding_gives_torch_ceil_mode_sizes(size):
    for window in (2, 3):
        lo, hi = ceil_pool_padding(size, window, 2)
        expected = -(-(size - window) // 2) + 1
        expected -= (expected - 1) * 2 >= size
        assert lo == 0 and (size + hi - window) // 2 + 1 == expected


def test_drop_path_drops_whole_examples_in_train_and_is_identity_in_eval():
    x = jnp.ones((64, 3, 3, 2))
    drop = drop_path(0.5)
    y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    per_example = y.reshape(64, -1)
    assert set(np.unique(per_example).tolist()) == {0.0, 2.0}
    assert bool(jnp.all(per_example.min(axis=1) == per_example.max(axis=1)))
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)


@pytest.mark.slow  # 17-27 s measured on 2 busy cores, mostly compiling
def test_stochastic_depth_rate_one_drops_the_whole_branch():
    """At rate 1 a ConvNeXt block and a residual MBConv are the identity in training (the branch
    is dropped for every example) and not in eval (the branch is kept)."""
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
    blocks = [
        ConvNeXtBlock(drop_path=1.0, layer_scale=1.0),
        MBConv(8, expansion=2, drop_path=1.0, norm=batch_norm(True)),
    ]
    for block in blocks:

        @jax.jit
        def run(key, block=block):
            variables = block.init(key, x)
            apply = functools.partial(block.apply, variables, x, mutable=["batch_stats"])
            return apply(True, rngs={"dropout": key})[0], apply(False)[0]

        y_train, y_eval = run(jax.random.key(0))
        np.testing.assert_array_equal(y_train, x)
        assert not np.allclose(y_eval, x)
