"""cnnjax: convolutional networks in JAX/Flax.

The public API, re-exported explicitly. TensorFlow (used only to read TFDS data) is never
imported by ``import cnnjax``.
"""

from cnnjax import models
from cnnjax.errors import CnnjaxError
from cnnjax.nn import layers, ops
from cnnjax.nn.layers import BottleneckBlock, ConvBN, DenseHead, GlobalAvgPool, ResidualBlock
from cnnjax.run.state import TrainState, create_train_state

__version__ = "0.1.0"

__all__ = [
    "BottleneckBlock",
    "CnnjaxError",
    "ConvBN",
    "DenseHead",
    "GlobalAvgPool",
    "ResidualBlock",
    "TrainState",
    "create_train_state",
    "layers",
    "models",
    "ops",
]
