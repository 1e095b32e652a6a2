"""FLOPs of a compiled step and the peak of the device it runs on: model FLOPs utilisation.

MFU = (FLOPs of one step, by XLA's cost analysis of the compiled program) x (steps per second)
/ (the device's peak FLOP/s at the step's compute dtype). XLA counts a matmul or convolution as
2 FLOPs per multiply-accumulate (on real, unpadded inputs) and adds the elementwise work, so a
train step's count is what the program really does, not a published per-image figure.

    compiled = jax.jit(step).lower(state, batch).compile()
    mfu = step_flops(compiled) * steps_per_s / peak_flops(jax.devices()[0], "bfloat16")

Peaks are the vendors' dense (no sparsity) figures, by ``device.device_kind``; a device that is
not in the table (every CPU) has None, and ``measure_matmul_flops`` gives a measured stand-in.
"""

import time

import numpy as np

# (device_kind, dtype) -> dense peak FLOP/s from the vendors' data sheets. "float32" is what
# XLA's default matmul precision runs float32 dots and convolutions at: TF32 tensor cores on
# NVIDIA A100/H100/H200, bf16 passes on TPUs (so the bf16 peak).
_PEAKS: dict[str, dict[str, float]] = {
    # NVIDIA H100 SXM5 and H200 SXM: 989.4 TFLOP/s bf16/fp16, 494.7 TF32 (dense).
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "NVIDIA H200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    # NVIDIA H100 PCIe: 756 bf16/fp16, 378 TF32.
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    # NVIDIA A100 (SXM4 and PCIe, 40 and 80 GB): 312 bf16/fp16, 156 TF32.
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "NVIDIA A100-PCIE-40GB": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    # Cloud TPU chips (bf16 MXUs): v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOP/s.
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}


def step_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program, by XLA's cost analysis.

    Args:
      compiled: ``jax.jit(f).lower(*args).compile()`` (a ``jax.stages.Compiled``).

    Returns:
      The program's ``flops``, or None where the backend gives no cost analysis.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some PJRT plugins do not implement it
        return None
    # jax < 0.4.32 returned one dict per program in a list.
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return float(flops) if flops and flops > 0 else None


def peak_flops(device, dtype="bfloat16") -> float | None:
    """The dense peak FLOP/s of ``device`` at ``dtype``, or None when unknown (any CPU).

    Args:
      device: a ``jax.Device`` or its ``device_kind`` string ("NVIDIA H200", "TPU v5 lite").
      dtype: the compute dtype (name or numpy/jax dtype): bfloat16, float16 or float32.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return _PEAKS.get(kind.strip(), {}).get(name)


def measure_matmul_flops(dtype="float32", n: int = 2048, repeats: int = 5, device=None) -> float:
    """Measured FLOP/s of an ``n x n`` matmul on ``device`` (default: JAX's default device): the
    stand-in peak where ``peak_flops`` has none. Best of ``repeats`` after one compile run."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    if device is not None:
        a = jax.device_put(a, device)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def mfu(flops_per_step: float | None, steps_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the FLOPs or the peak are unknown)."""
    if not flops_per_step or not peak:
        return None
    return flops_per_step * steps_per_s / peak
