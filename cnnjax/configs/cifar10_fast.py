"""CIFAR-10 speed run for a GPU VM, airbench-style: the fast small-image net (wide conv groups,
BatchNorm, bias-free convs), the whole dataset resident on the accelerator with crop and flip
augmentation on device, label smoothing, one-cycle Nesterov SGD and flip test-time augmentation.

Run:
    python -m cnnjax.train --config=cifar10_fast --workdir=checkpoints/cifar10_fast

On a GPU or TPU add ``--config.dtype=bfloat16``: convolutions and matmuls compute in bfloat16
while the parameters, optimizer state and BatchNorm statistics stay float32 (``dtype`` is the
compute dtype). The preset keeps float32 so that its numbers are the same on every platform, and
``dtype`` is part of a run's identity: a workdir resumes only with the dtype it started with.

Not measured by the project yet (it needs a GPU); airbench reaches 94% with a similar recipe in
about 10 epochs.
"""

from ml_collections import ConfigDict

from cnnjax.configs import default


def get_config():
    c = default.get_config()
    c.model = ConfigDict(
        {"name": "fast_cnn", "stem_width": 32, "widths": (64, 256, 256), "depth": 2}
    )
    c.dataset = "cifar10"
    c.num_epochs = 10
    c.batch_size = 1024
    c.optimizer = "sgd"
    c.learning_rate = 2.0
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    c.warmup_epochs = 2.0
    c.label_smoothing = 0.2
    c.augment = "crop(pad=2),flip"
    c.flip_tta = True
    c.data.validation_fraction = 0.0
    c.data.eval_batch_size = 2000
    c.log_every_steps = 20
    return c
