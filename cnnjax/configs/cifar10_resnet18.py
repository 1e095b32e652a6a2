"""CIFAR-10 with ResNet-18 (3x3 stem, no max-pool), SGD + Nesterov, cosine: for a GPU VM.

Run:
    python -m cnnjax.train --config=cifar10_resnet18 --workdir=checkpoints/cifar10_resnet18

On a GPU or TPU add ``--config.dtype=bfloat16``: convolutions and matmuls compute in bfloat16
while the parameters, optimizer state and BatchNorm statistics stay float32 (``dtype`` is the
compute dtype). The preset keeps float32 so that its numbers are the same on every platform, and
``dtype`` is part of a run's identity: a workdir resumes only with the dtype it started with.

Expected: ~95% test accuracy after 100 epochs (standard recipe; no augmentation beyond what the
config enables).
"""

from ml_collections import ConfigDict

from cnnjax.configs import default


def get_config():
    c = default.get_config()
    c.model = ConfigDict({"name": "resnet18", "small_input": True})
    c.dataset = "cifar10"
    c.num_epochs = 100
    c.batch_size = 512
    c.optimizer = "sgd"
    c.learning_rate = 0.4
    c.weight_decay = 5e-4
    c.schedule = "warmup_cosine"
    c.warmup_epochs = 2.0
    c.label_smoothing = 0.0
    c.data.validation_fraction = 0.0
    c.log_every_steps = 50
    return c
