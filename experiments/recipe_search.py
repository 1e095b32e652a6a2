"""Short Fashion-MNIST recipes side by side: test accuracy after every epoch, training seconds.

Each recipe is the ``default`` preset plus overrides (dotted keys, as on the command line) and
optionally a model; the script trains it in this process (no interpreter start-up or data
preparation per recipe: the figures are training time only, compilation in epoch 1) and
evaluates the test split after each epoch. Besides the zoo's models it registers ``plain``:
stages of 3x3 convolutions (optionally with BatchNorm), each optionally followed by a 2x2 max
pool, then flatten, a dense layer and the head; ``s2d=True`` replaces the full-resolution stem
by a 2x2 space-to-depth reshape (28x28x1 -> 14x14x4), which takes the first convolution and
pool off the 28x28 grid.

    python experiments/recipe_search.py '{"o": {"num_epochs": 3}}' \
        '{"o": {"num_epochs": 3}, "m": {"name": "plain", "s2d": true, "pools": [false, true]}}'

Prints one JSON line per recipe: ``epochs`` = [epoch, test accuracy, seconds, images/s].
"""

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="+", help='JSON: {"o": {KEY: VALUE}, "m": {model group}}')
    return p.parse_args(argv)


def register_plain():
    import flax.linen as nn
    import jax.numpy as jnp

    from cnnjax import models
    from cnnjax.nn.layers import ConvBN, DenseHead, MaxPool, batch_norm

    class Plain(nn.Module):
        num_classes: int = 10
        widths: Sequence[int] = (32, 64)
        convs: int = 1  # per stage
        pools: Sequence[bool] = ()  # per stage; empty: pool after every stage
        hidden: int = 128  # 0: no dense layer before the head
        dropout: float = 0.0  # before the head
        bn: bool = False
        s2d: bool = False
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = x.astype(self.dtype)
            norm = batch_norm(train, self.dtype) if self.bn else None
            if self.s2d:
                n, h, w, c = x.shape
                x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
                x = x.reshape(n, h // 2, w // 2, 4 * c)
            for i, features in enumerate(self.widths):
                for j in range(self.convs):
                    x = ConvBN(features, norm=norm, dtype=self.dtype, name=f"conv{i}_{j}")(x)
                if not self.pools or self.pools[i]:
                    x = MaxPool(2, name=f"pool{i}")(x)
            x = x.reshape(x.shape[0], -1)
            if self.hidden:
                x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
            return DenseHead(self.num_classes, self.dropout, self.dtype, name="head")(x, train)

    models.register(Plain, name="plain")


def recipe_config(recipe: dict):
    from ml_collections import ConfigDict

    from cnnjax.configs import default

    c = default.get_config()
    c.log_every_steps = 10**9  # no progress fetches
    c.update_from_flattened_dict(recipe.get("o", {}))
    if "m" in recipe:
        c.model = ConfigDict(recipe["m"])
    return c


def train(recipe: dict, workdir: Path) -> dict:
    import jax

    from cnnjax.train import hooks, loop, resume
    from cnnjax.train import setup as setup_lib

    c = recipe_config(recipe)
    run = setup_lib.setup(c, workdir)
    state = resume.initial_state(run)
    out = {"recipe": recipe, "params": sum(x.size for x in jax.tree.leaves(state.params))}
    out["epochs"], total = [], 0.0
    for epoch in range(c.num_epochs):
        start = time.perf_counter()
        state, _, ips = loop.epoch_steps(run, state, epoch, None, epoch == 0)
        seconds = time.perf_counter() - start
        total += seconds
        acc = hooks.split_metrics(run, state, "test")["test_accuracy"]
        out["epochs"].append([epoch + 1, round(acc, 4), round(seconds, 1), round(ips)])
    out["train_s"] = round(total, 1)
    return out


def main(argv=None):
    args = parse_args(argv)
    from cnnjax import cli

    cli.configure_xla()
    cli.enable_compilation_cache()
    register_plain()
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.recipes:
            print(json.dumps(train(json.loads(text), Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
