"""cnnjax.summary: per-layer table, totals, MACs against published numbers and XLA."""

import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from cnnjax import models
from cnnjax.cli import parse_shape
from cnnjax.nn.layers import BatchNorm
from cnnjax.tools.summary import SummaryTable, summary

REPO = Path(__file__).resolve().parents[1]


def _xla_flops_per_image(model, shape) -> float:
    """FLOPs of the compiled eval forward pass of one image, by XLA's cost analysis."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    forward = jax.jit(lambda v, x: model.apply(v, x))
    cost = forward.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return cost["flops"]


def test_resnet50_matches_published_counts():
    table = summary(models.get("resnet50", num_classes=1000), (224, 224, 3), print_fn=None)
    assert isinstance(table, SummaryTable)
    assert table.params == 25_557_032
    assert table.state == 53_120  # BatchNorm means and variances
    # torchvision's table: 4.09 GFLOPS (its name for MACs of the convs and the classifier).
    assert table.macs == 4_089_184_256 == imagenet_resnet_macs((3, 4, 6, 3), bottleneck=True)
    assert table.flops == 2 * table.macs


def imagenet_resnet_macs(blocks, bottleneck: bool, width_factor: int = 1) -> int:
    """MACs of a torchvision ResNet at 224 px, layer by layer from the architecture: the 7x7/2
    stem (112 px), a stride-2 max pool (56 px), four stages of ``blocks`` (planes 64 * 2**i at
    56 / 2**i px, stride 2 in the first 3x3 conv of stages 2-4), 1x1 projection shortcuts where
    the shape changes, and the 1000-way classifier."""
    macs = 112 * 112 * 7 * 7 * 3 * 64
    cin, size_in = 64, 56
    for i, n in enumerate(blocks):
        planes, size = 64 * 2**i, 56 // 2**i
        out = planes * (4 if bottleneck else 1)
        width = planes * width_factor  # wide_resnet50_2: twice the bottleneck width
        for b in range(n):
            r_in = size_in if b == 0 else size
            if bottleneck:  # 1x1 reduce at the input size, then 3x3 and 1x1 expand
                macs += r_in**2 * cin * width + size**2 * (9 * width * width + width * out)
            else:
                macs += size**2 * 9 * (cin * out + out * out)
            if b == 0 and (cin != out or size != r_in):
                macs += size**2 * cin * out
            cin = out
        size_in = size
    return macs + cin * 1000


def cifar_resnet_macs(depth: int) -> int:
    """He et al.'s CIFAR ResNet at 32 px: the 3x3 stem (32 px, 16 channels), three stages of n
    blocks (16/32/64 channels at 32/16/8 px, each first conv of stages 2-3 reading half the
    channels at stride 2), option-A shortcuts without MACs, the 64x10 head: every 3x3 conv but
    the stem and the two stride-2 ones costs 2,359,296 MACs, those two half that, so the total is
    442,368 + 2,359,296 (6n - 1) + 640."""
    n = (depth - 2) // 6
    per_conv = 32 * 32 * 9 * 16 * 16  # == 16 * 16 * 9 * 32 * 32 == 8 * 8 * 9 * 64 * 64
    return 32 * 32 * 9 * 3 * 16 + per_conv * (6 * n - 1) + 64 * 10


@pytest.mark.parametrize(
    "name,macs",
    [
        ("resnet18", imagenet_resnet_macs((2, 2, 2, 2), bottleneck=False)),  # torchvision 1.81
        ("resnet34", imagenet_resnet_macs((3, 4, 6, 3), bottleneck=False)),  # 3.66
        ("resnet101", imagenet_resnet_macs((3, 4, 23, 3), bottleneck=True)),  # 7.80
        ("resnet152", imagenet_resnet_macs((3, 8, 36, 3), bottleneck=True)),  # 11.51
        ("wide_resnet50_2", imagenet_resnet_macs((3, 4, 6, 3), True, width_factor=2)),  # 11.40
    ],
)
def test_imagenet_resnet_macs_are_exact(name, macs):
    table = summary(models.get(name, num_classes=1000), (224, 224, 3), print_fn=None)
    assert table.macs == macs


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_macs_are_exact(depth):
    table = summary(models.get(f"resnet{depth}", num_classes=10), (32, 32, 3), print_fn=None)
    assert table.macs == cifar_resnet_macs(depth)
    # BatchNorm mean and variance after the stem and every conv: (16 + 2n * 112) channels.
    n = (depth - 2) // 6
    assert table.state == 2 * (16 + 2 * n * 112)


def test_rows_add_up_and_name_layers():
    table = summary(models.get("resnet18", num_classes=10), (32, 32, 3), print_fn=None)
    assert sum(r.params for r in table.rows) == table.params
    assert sum(r.macs for r in table.rows) == table.macs
    by_path = {r.path: r for r in table.rows}
    conv = by_path["stage1_block1/conv_bn1/conv"]
    assert conv.module == "Conv" and conv.output_shape == (1, 8, 8, 64)
    assert conv.params == 3 * 3 * 64 * 64
    assert conv.macs == 8 * 8 * 3 * 3 * 64 * 64
    assert by_path["head/fc"].macs == 512 * 10
    assert by_path["stem_pool"].params == 0


def test_layer_owning_params_beside_submodules_is_counted():
    """ConvNeXt blocks hold their layer scale directly, next to child modules."""
    model = models.get(
        "convnext_tiny", num_classes=10, small_input=True, depths=(1, 1), dims=(16, 32)
    )
    table = summary(model, (32, 32, 3), print_fn=None, batch_size=2)
    assert sum(r.params for r in table.rows) == table.params
    block = {r.path: r for r in table.rows}["stage1_block1"]
    assert block.params == 16 and block.output_shape == (2, 32, 32, 16)


class _Norms(nn.Module):
    """Only BatchNorms: cnnjax's (its __call__ calls nn.BatchNorm's, the same module) and
    Flax's."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = BatchNorm(train=train, name="bn")(x)
        return nn.BatchNorm(use_running_average=not train, name="flax_bn")(x)


@pytest.mark.parametrize(
    "model,shape",
    [
        (models.get("resnet20", num_classes=10), (32, 32, 3)),
        (models.get("mobilenet_v2", num_classes=10), (32, 32, 3)),
        (_Norms(), (4, 4, 3)),
    ],
    ids=["resnet20", "mobilenet_v2", "batchnorm_only"],
)
def test_one_row_per_layer_holding_all_its_variables(model, shape):
    """Each layer is one row (a BatchNorm too, whose __call__ calls nn.BatchNorm's), its
    params trainable, its batch_stats non-trainable; rows and totals add up to the variables."""
    table = summary(model, shape, print_fn=None)
    paths = [r.path for r in table.rows]
    assert len(paths) == len(set(paths))
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    size = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
    assert table.params == sum(r.params for r in table.rows) == size(variables["params"])
    assert table.state == sum(r.state for r in table.rows) == size(variables["batch_stats"])
    assert table.params + table.state == size(variables)
    norms = [r for r in table.rows if r.module == "BatchNorm"]
    assert norms and all(r.params == r.state > 0 for r in norms)  # scale, bias | mean, var


class _SharedDense(nn.Module):
    """One Dense layer applied twice."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        dense = nn.Dense(3, name="shared")
        return dense(dense(x))


def test_a_layer_called_twice_is_one_row_with_both_calls_macs():
    lines = []
    table = summary(_SharedDense(), (2, 2, 3), print_fn=lines.append)
    (row,) = table.rows
    assert (row.path, row.calls, row.output_shape) == ("shared", 2, (1, 2, 2, 3))
    assert row.params == table.params == 3 * 3 + 3  # counted once
    assert row.macs == table.macs == 2 * (2 * 2 * 3 * 3)  # each call: 4 positions x 3 x 3
    assert "shared (x2)" in lines[0] and "(xN): called N times" in lines[0]


def test_depthwise_conv_macs_divide_by_groups():
    model = models.get("mobilenet_v2", num_classes=10)
    rows = {r.path: r for r in summary(model, (64, 64, 3), print_fn=None).rows}
    depthwise = rows["stage1_block1/depthwise/conv"]
    assert depthwise.macs == 32 * 32 * 3 * 3 * 32


def test_prints_a_table():
    lines = []
    table = summary(models.get("lenet5"), (32, 32, 1), print_fn=lines.append)
    text = lines[0]
    assert text == str(table)
    for needle in ("conv1/conv", "(1,28,28,6)", "61,706", "Trainable params", "FLOPs per image"):
        assert needle in text


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="H, W, C"):
        summary(models.get("lenet5"), (1, 32, 32, 1), print_fn=None)
    with pytest.raises(ValueError, match="H,W,C"):
        parse_shape("32,32")


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [
        ("resnet18", (64, 64, 3), {}),
        ("vgg11", (32, 32, 3), {"small_input": True}),
        ("mobilenet_v2", (64, 64, 3), {}),
    ],
)
def test_flops_agree_with_xla_cost_analysis(name, shape, kwargs):
    """XLA skips the kernel taps that land on zero padding, so compare like with like. XLA also
    counts the elementwise work the table leaves out (bias add 1 flop, inference BatchNorm's
    scale and shift 2, ReLU 1, residual add 1, pooling comparisons): at most 4 flops per element
    of a layer output here (measured 1.4-2.2), so XLA's count lies in
    [table, table + 4 * output elements]."""
    model = models.get(name, num_classes=10, **kwargs)
    table = summary(model, shape, count_padding=False, print_fn=None)
    elements = sum(math.prod(r.output_shape) for r in table.rows)
    assert table.flops <= _xla_flops_per_image(model, shape) <= table.flops + 4 * elements
    assert summary(model, shape, print_fn=None).macs > table.macs


class _BiasFreeStack(nn.Module):
    """Only convolutions and a dense layer, no bias, norm or activation: nothing but MACs."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.Conv(6, (3, 3), strides=2, use_bias=False)(x)  # SAME padding at stride 2
        x = nn.Conv(4, (5, 5), padding="VALID", use_bias=False)(x)
        return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("shape", [(9, 9, 3), (16, 16, 3)])
def test_flops_equal_xla_cost_analysis_exactly_on_macs_only_models(shape):
    """Where a model is nothing but MACs, the table without padded taps is XLA's count exactly."""
    model = _BiasFreeStack()
    table = summary(model, shape, count_padding=False, print_fn=None)
    assert table.flops == _xla_flops_per_image(model, shape)
    assert summary(model, shape, print_fn=None).macs > table.macs  # SAME padding adds taps


def test_published_convention_agrees_with_xla_on_large_maps():
    """VGG-11 at 224 px: the published convention counts every 3x3 tap, XLA only those on real
    pixels. A SAME 3x3 conv on an H x H map reads (3H - 2)^2 of its 9 H^2 taps, so the padded
    ones are exactly sum((9 H^2 - (3H - 2)^2) c_in c_out) over the convs (4.0% of the total),
    and XLA's count is the rest plus the elementwise work (see the test above)."""
    model = models.get("vgg11", num_classes=10)
    table = summary(model, (224, 224, 3), print_fn=None)
    real = summary(model, (224, 224, 3), count_padding=False, print_fn=None)
    convs = [(224, 3, 64), (112, 64, 128), (56, 128, 256), (56, 256, 256)]
    convs += [(28, 256, 512), (28, 512, 512), (14, 512, 512), (14, 512, 512)]
    padded = sum((9 * h * h - (3 * h - 2) ** 2) * cin * cout for h, cin, cout in convs)
    assert table.macs - real.macs == padded
    elements = sum(math.prod(r.output_shape) for r in real.rows)
    assert real.flops <= _xla_flops_per_image(model, (224, 224, 3)) <= real.flops + 4 * elements


def _cli(*args):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "cnnjax.summary", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_cli_prints_summary():
    result = _cli("--model", "lenet5", "--input-shape", "32,32,1", "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    assert "61,706" in result.stdout and "conv2/conv" in result.stdout


def test_cli_unknown_model_is_one_line_error():
    result = _cli("--model", "no_such_net")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown model 'no_such_net'" in result.stderr and "Traceback" not in result.stderr
