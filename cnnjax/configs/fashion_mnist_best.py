"""Fashion-MNIST, best accuracy on a 2-core CPU within 20 minutes: the tutorial CIFAR CNN
(3 x [2 x Conv-BN-ReLU, max-pool, dropout 0.25], Dense 256, dropout 0.5) with label smoothing,
one-cycle SGD with Nesterov momentum and an EMA of the weights.

Run:
    python -m cnnjax.train --config=fashion_mnist_best --workdir=checkpoints/fashion_mnist_best

Measured on the reference machine (2 CPU cores, quiet, data prepared): **93.34 % test accuracy**
(validation 94.28 %) in 18 min 47 s under ``/usr/bin/time`` (``wall_s`` 1126), about 470
training images/s, peak RSS 2.0 GB. The default preset reaches 92.45 % in 2 min 38 s.
"""

from ml_collections import ConfigDict

from cnnjax.configs import default


def get_config():
    c = default.get_config()
    c.model = ConfigDict({"name": "cifar_cnn", "widths": (32, 64, 128)})
    c.num_epochs = 9  # ~125 s an epoch here: 9 fit in 20 minutes with evaluation
    c.batch_size = 128
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    c.warmup_epochs = 2.0
    c.label_smoothing = 0.1
    # No augmentation. Flips hurt: Fashion-MNIST's sneakers and ankle boots all face one way
    # (99.7 % and 100 % of the training images match their class mean better than its mirror
    # image), and flip TTA took the default preset from 92.45 % to 83.68 % test. With crop and
    # flip (and flip TTA) this preset reached only 92.12 % in the same 9 epochs: this dropout net
    # underfits so short a run, and augmentation slowed it down further.
    c.augment = ""
    c.ema_decay = 0.999
    return c
