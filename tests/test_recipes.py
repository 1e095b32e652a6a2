"""Training recipes on the tiny preset: ReduceLROnPlateau + EarlyStopping, freezing, transfer
from another run, EMA, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import checkpoint, evaluation, models, optim, trainer
from cnnjax.errors import CheckpointError
from cnnjax.train_state import create_train_state


def variant(config, **overrides):
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def test_plateau_lowers_lr_and_early_stopping_restores_the_best(tiny_config, tmp_path):
    config = variant(
        tiny_config,
        num_epochs=8,
        optimizer="sgd",
        learning_rate=1e-6,  # a plateau from the first epoch on
        momentum=0.0,
        **{
            "plateau.patience": 1,
            "plateau.factor": 0.5,
            "early_stopping_patience": 3,
            "early_stopping_min_delta": 1e-3,
            "checkpointing.best_metric": "eval_loss",
            "checkpointing.best_mode": "min",
            "checkpointing.max_to_keep": 1,
        },
    )
    final = trainer.train_and_evaluate(config, tmp_path)
    lines = trainer.metrics_lib.read_lines(tmp_path)
    lrs = [line["learning_rate"] for line in lines]
    assert len(lines) == 4 < config.num_epochs  # epoch 1 is best; 3 more without improvement
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] < lrs[0] / 2  # lowered at least twice
    # The final state is the best checkpoint Orbax kept (by eval_loss; min_delta only decides
    # when to stop).
    best = evaluation.evaluate_run(tmp_path, split="test")
    assert final["early_stopped"] and final["epoch"] == best["epoch"]
    assert final["test_accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-6)
    assert final["test_loss"] == pytest.approx(best["test_loss"], rel=1e-6)


def initial_params(config):
    model = trainer.build_model(config, 10)
    tx, _ = optim.create_optimizer(config, 16)
    state = trainer.initial_state(config, model, tx, (28, 28, 1), trainer.parallel.make_mesh())
    return jax.device_get(state.params), jax.device_get(state.batch_stats)


def restored(config, workdir):
    run = trainer.setup(config, workdir)
    model = trainer.build_model(config, 10)
    tx, _ = optim.create_optimizer(config, run.steps_per_epoch)
    state, _ = trainer.restore(run, checkpoint.run_manager(config, workdir, True), model, tx)
    return jax.device_get(state)


def test_frozen_backbone_is_bit_identical(tiny_config, tmp_path):
    config = variant(tiny_config, **{"model.name": "cifar_cnn"}, num_epochs=1, freeze="backbone")
    params0, stats0 = initial_params(config)
    state = restored(config, tmp_path) if trainer.train_and_evaluate(config, tmp_path) else None
    for name in params0:
        same = jax.tree.map(np.array_equal, params0[name], state.params[name])
        assert all(jax.tree.leaves(same)) == (name != "head"), name
    jax.tree.map(np.testing.assert_array_equal, stats0, state.batch_stats)  # BN frozen too


def test_finetune_trains_top_at_smaller_lr_and_freezes_the_rest(tiny_config):
    config = variant(tiny_config, freeze="backbone", finetune="^fc1/")
    labels = optim.param_labels(config, initial_params(config)[0])
    assert labels["head"]["fc"]["kernel"] == "train"
    assert labels["fc1"]["kernel"] == "finetune"
    assert labels["conv1"]["conv"]["kernel"] == "frozen"


def test_init_from_loads_matching_params_and_rejects_another_model(tiny_config, tmp_path):
    source = tmp_path / "source"
    trainer.train_and_evaluate(variant(tiny_config, num_epochs=1), source)
    pretrained = restored(tiny_config, source).params
    config = variant(tiny_config, init_from=str(source), seed=5)
    loaded, _ = initial_params(config)
    jax.tree.map(np.testing.assert_array_equal, pretrained, loaded)

    other = variant(tiny_config, **{"model.name": "cifar_cnn"}, init_from=str(source))
    with pytest.raises(CheckpointError, match="do not match the pretrained run.*block1_conv1"):
        initial_params(other)


def test_init_from_gives_a_new_head_for_another_class_count(tiny_config, tmp_path):
    source = tmp_path / "source"
    trainer.train_and_evaluate(variant(tiny_config, num_epochs=1), source)
    model = models.get("simple_cnn", 3)
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), (28, 28, 1))
    loaded = trainer.transfer.load_pretrained(state, source)
    assert loaded.params["head"]["fc"]["kernel"].shape == (128, 3)
    np.testing.assert_array_equal(
        loaded.params["conv1"]["conv"]["kernel"],
        restored(tiny_config, source).params["conv1"]["conv"]["kernel"],
    )


def test_ema_tracks_params_with_decay_warmup_and_is_what_eval_uses():
    model = models.get("simple_cnn", 10)
    state = create_train_state(model, optax.sgd(0.5), jax.random.key(0), (8, 8, 1), ema_decay=0.9)
    grads = jax.tree.map(jnp.ones_like, state.params)

    def check(state, decay):
        new = state.apply_gradients(grads=grads)
        want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), want, new.ema_params)
        return new

    new = check(state, decay=0.1)  # step 0: min(0.9, 1 / 10)
    check(new.replace(step=jnp.asarray(1000)), decay=0.9)  # warmed up: ema_decay
    assert new.eval_params() is new.ema_params


def test_bfloat16_trains_like_float32(tiny_config, tmp_path):
    # A short real run: the default recipe for 100 steps on 12,800 images, tested on all 10,000
    # test images. Gradient clipping as the README advises for bf16 (without it, this warmup to
    # lr 0.2 collapses the bf16 run).
    recipe = {"optimizer": "sgd", "learning_rate": 0.2, "schedule": "onecycle", "num_epochs": 1}
    recipe |= {"batch_size": 128, "label_smoothing": 0.1, "weight_decay": 5e-4}
    recipe |= {"grad_clip_norm": 1.0, "data.limit_examples": 12800, "data.eval_batch_size": 1000}
    short = variant(tiny_config, **recipe)
    f32 = trainer.train_and_evaluate(short, tmp_path / "f32")
    bf16 = trainer.train_and_evaluate(variant(short, dtype="bfloat16"), tmp_path / "bf16")
    assert np.isfinite(bf16["train_loss"]) and np.isfinite(bf16["test_loss"])
    assert f32["test_accuracy"] > 0.8  # a trained model, so the comparison means something
    assert abs(bf16["test_accuracy"] - f32["test_accuracy"]) <= 0.005  # within half a point
    state = restored(variant(short, dtype="bfloat16"), tmp_path / "bf16")
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(state.params))
