"""Fashion-MNIST, best accuracy on a 2-core CPU within ~20 minutes: the tutorial CIFAR CNN
(3 x [2 x Conv-BN-ReLU, max-pool, dropout]) with on-device crop and flip augmentation, label
smoothing, one-cycle SGD with Nesterov momentum, an EMA of the weights and flip test-time
augmentation.

Run:
    python -m cnnjax.train --config=fashion_mnist_best --workdir=checkpoints/fashion_mnist_best

The README states the accuracy and time this preset reached on the reference machine.
"""

from cnnjax.configs import default


def get_config():
    c = default.get_config()
    c.model = "cifar_cnn"
    c.model_kwargs = "{'widths': (32, 64, 128)}"
    c.num_epochs = 9
    c.batch_size = 128
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    c.warmup_epochs = 2.0
    c.label_smoothing = 0.1
    c.augment = "crop(pad=2),flip"
    c.ema_decay = 0.999
    c.flip_tta = True
    return c
