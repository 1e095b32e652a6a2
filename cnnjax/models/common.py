"""Small helpers shared by the zoo's families (not models; nothing here registers). Pooling,
adaptive and ceil-mode included, lives in ``cnnjax.nn.pooling``."""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from cnnjax.errors import ConfigError
from cnnjax.nn import kernels
from cnnjax.nn.layers import conv_kernel_init

# Rematerialisation (``config.remat``): the ``jax.checkpoint_policies`` that suit convnets, by
# name. Each says what a rematerialised block keeps for the backward pass besides its input;
# everything else in it is recomputed from that input.
REMAT_POLICIES: dict[str, Callable[..., bool]] = {
    # Nothing: the whole block runs again in the backward pass (least memory, most compute).
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    # Convolution and matmul outputs: only norms, activations and adds are recomputed.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Matmuls without batch dimensions: Dense layers (ConvNeXt's MLPs), not convolutions.
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# ``blocks`` rematerialises each repeated block of a model (residual, bottleneck, inverted
# residual, dense layer, inception...) keeping nothing but its input; ``blocks:POLICY`` keeps
# what POLICY says as well. The whole forward pass under one remat is not offered: with any of
# these policies it saved nothing on ResNet-50 (experiments/README.md, "Rematerialisation").
REMAT_CHOICES = ("none", "blocks", *(f"blocks:{policy}" for policy in REMAT_POLICIES))


def remat_policy(remat: str) -> Callable[..., bool] | None:
    """The checkpoint policy of a ``config.remat`` value; None for ``none``.

    Raises:
      ConfigError: ``remat`` is not one of ``REMAT_CHOICES`` (the message lists them).
    """
    if remat not in REMAT_CHOICES:
        raise ConfigError(f"--config.remat={remat} must be one of {', '.join(REMAT_CHOICES)}")
    if remat == "none":
        return None
    return REMAT_POLICIES[remat.partition(":")[2] or "nothing_saveable"]


def maybe_remat(block: type[nn.Module], remat: str, static_argnums: Sequence[int] = ()):
    """``block`` (a Module class), rematerialised when ``remat`` is ``blocks[:POLICY]``: its
    activations are recomputed in the backward pass instead of kept (``nn.remat``). Parameter
    and ``batch_stats`` paths are unchanged: the wrapped class keeps the instance's name and
    scope.

    Args:
      block: the block's class.
      remat: a ``config.remat`` value; ``none`` returns ``block``.
      static_argnums: positions of ``__call__``'s Python arguments, counting ``self`` as 0:
        ``(2,)`` for ``__call__(self, x, train)``, which must then be passed positionally.

    On CPU the recomputation survives compilation only with XLA's ``cse_barrier_expander`` pass
    disabled, as ``cnnjax.cli.CPU_FLAGS`` does; otherwise XLA merges it back into the forward
    pass (same results, no memory saved).
    """
    policy = remat_policy(remat)
    if policy is None:
        return block
    return _rematerialised(block, policy, tuple(static_argnums))


@functools.cache
def _rematerialised(block, policy, static_argnums):
    # One wrapped class per (block, policy): not a new class for every block of every trace.
    return nn.remat(block, policy=policy, static_argnums=static_argnums)


def drop_path(rate: float, name: str | None = None) -> nn.Dropout:
    """Stochastic depth (torchvision ``StochasticDepth(p, "row")``): in training, zero a whole
    residual branch per example with probability ``rate`` and scale survivors by
    ``1 / (1 - rate)``; identity in eval. Call the result as ``drop(x, deterministic=not train)``;
    it draws from the ``dropout`` rng collection.
    """
    # Broadcasting the mask over H, W and C drops whole examples of an NHWC tensor.
    return nn.Dropout(rate, broadcast_dims=(1, 2, 3), name=name)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of ``divisor`` without losing more than 10%
    (torchvision's ``_make_divisible``, used by MobileNet and EfficientNet width scaling)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def torch_padding(kernel_size: int | Sequence[int], stride: int = 1, dilation: int = 1):
    """Torch's symmetric ``padding = dilation * (k - 1) // 2`` on both sides, as Flax explicit
    ``((p, p), (p, p))`` pairs (for odd kernels).

    Flax's ``"SAME"`` equals it at stride 1 but pads a stride-2 layer unevenly (all of the
    padding at the bottom/right when the size is even), which shifts every window by one pixel
    against torch: weights trained in torch need the torch padding. ``stride`` is accepted so a
    call names the layer it pads; the padding does not depend on it.
    """
    del stride
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    return tuple((dilation * (k - 1) // 2,) * 2 for k in ks)


def bare_conv(features: int, kernel_size: Sequence[int], dtype, name: str, strides=(1, 1)):
    """A bias-free conv with torch's symmetric ``k // 2`` padding, for pre-activation blocks
    (norm -> act -> conv), where ``ConvBN``'s conv -> norm -> act order does not fit."""
    return nn.Conv(
        features,
        tuple(kernel_size),
        tuple(strides),
        padding=kernel_size[0] // 2,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        conv_general_dilated=kernels.conv_general_dilated,  # XLA's or oneDNN's (CPU)
        name=name,
    )
