"""train.flops: XLA's cost analysis of a compiled program counts a matmul and a convolution as
2 FLOPs per multiply-accumulate (so the MFU of a step is its real work), and the peak table is
looked up by device kind and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import flops

CPU = jax.devices("cpu")[0]  # XLA:CPU's cost analysis, whatever the default device


def on_cpu(*arrays):
    return [jax.device_put(a, CPU) for a in arrays]


def test_step_flops_of_a_matmul_is_twice_its_macs():
    m, k, n = 24, 40, 56
    a, b = on_cpu(jnp.ones((m, k)), jnp.ones((k, n)))
    compiled = jax.jit(jnp.dot).lower(a, b).compile()
    assert flops.step_flops(compiled) == 2 * m * k * n


def test_step_flops_of_a_convolution_is_twice_its_macs():
    """A VALID 3x3 stride-1 convolution, no bias: every output reads 3 * 3 * c_in real inputs."""
    n, h, w, c_in, c_out, k = 2, 10, 12, 3, 8, 3
    x, kernel = on_cpu(jnp.ones((n, h, w, c_in)), jnp.ones((k, k, c_in, c_out)))
    conv = jax.jit(
        lambda x, kernel: jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    macs = n * (h - k + 1) * (w - k + 1) * c_out * k * k * c_in
    assert flops.step_flops(conv.lower(x, kernel).compile()) == 2 * macs


def test_step_flops_is_none_without_a_cost_analysis():
    class NoCost:
        def cost_analysis(self):
            raise NotImplementedError

    class Empty:
        def cost_analysis(self):
            return [{}]  # the list form of older jax

    assert flops.step_flops(NoCost()) is None and flops.step_flops(Empty()) is None


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("NVIDIA H200", "bfloat16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989.4e12),
        ("NVIDIA H100 80GB HBM3", np.float32, 494.7e12),  # TF32: XLA's default precision
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "float16", 312e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v4", "bfloat16", 275e12),
        ("NVIDIA GeForce RTX 4090", "bfloat16", None),  # not in the table
        ("cpu", "float32", None),
        ("NVIDIA H200", "int8", None),
    ],
)
def test_peak_flops_by_kind_and_dtype(kind, dtype, peak):
    assert flops.peak_flops(kind, dtype) == peak


def test_peak_of_a_cpu_device_is_unknown_and_measured_instead():
    assert flops.peak_flops(CPU, "float32") is None
    measured = flops.measure_matmul_flops("float32", n=64, repeats=2, device=CPU)
    assert measured > 0


def test_mfu():
    assert flops.mfu(2e9, 100.0, 1e12) == pytest.approx(0.2)
    assert flops.mfu(None, 100.0, 1e12) is None and flops.mfu(2e9, 100.0, None) is None
