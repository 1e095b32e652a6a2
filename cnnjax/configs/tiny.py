"""Tiny preset for tests and smoke runs: a few hundred Fashion-MNIST images, seconds on a CPU.

Run:
    python -m cnnjax.train --config=tiny --workdir=/tmp/tiny
"""

from cnnjax.configs import default


def get_config():
    c = default.get_config()
    c.num_epochs = 2
    c.batch_size = 32
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.schedule = "constant"
    c.label_smoothing = 0.0
    c.log_every_steps = 5
    c.data.limit_examples = 512  # per split; 0: all
    c.data.eval_batch_size = 128
    return c
