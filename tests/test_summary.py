"""cnnjax.summary: per-layer table, totals, MACs against published numbers and XLA."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from cnnjax import models
from cnnjax.cli import parse_shape
from cnnjax.summary import SummaryTable, summary

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
    assert table.macs == pytest.approx(4.1e9, rel=0.03)  # torchvision: 4.09 GFLOPS (MACs)
    assert table.flops == 2 * table.macs


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
    """XLA skips the kernel taps that land on zero padding, so compare like with like: on these
    small feature maps the padded taps are up to a quarter of the convention's count."""
    model = models.get(name, num_classes=10, **kwargs)
    table = summary(model, shape, count_padding=False, print_fn=None)
    assert table.flops == pytest.approx(_xla_flops_per_image(model, shape), rel=0.10)
    assert summary(model, shape, print_fn=None).macs > table.macs


def test_published_convention_agrees_with_xla_on_large_maps():
    model = models.get("vgg11", num_classes=10)
    table = summary(model, (224, 224, 3), print_fn=None)
    assert table.flops == pytest.approx(_xla_flops_per_image(model, (224, 224, 3)), rel=0.10)


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
