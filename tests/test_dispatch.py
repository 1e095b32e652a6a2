"""Several train steps per dispatch (``config.steps_per_dispatch``): a device loop over resident
batches, compiled once, giving the same bits however an epoch is split into dispatches and
from whichever batch it is resumed."""

import jax
import numpy as np
import pytest
from conftest import variant

from cnnjax.run import metrics as metrics_lib
from cnnjax.train import eval_steps, loop, resume
from cnnjax.train import setup as setup_lib


def test_dispatches_end_on_multiples_after_a_first_single_step():
    assert list(loop.dispatch_ends(0, 16, (5, 50))) == [1, 5, 10, 15, 16]
    # Logs (every 4) and dispatch ends (every 6) both get a boundary.
    assert list(loop.dispatch_ends(0, 13, (6, 4))) == [1, 4, 6, 8, 12, 13]
    # Entered mid-epoch (a resume): the same boundaries after the first step.
    assert list(loop.dispatch_ends(7, 16, (5, 50))) == [8, 10, 15, 16]
    assert list(loop.dispatch_ends(0, 3, (1, 50))) == [1, 2, 3]
    assert list(loop.dispatch_ends(16, 16, (5, 50))) == []


def test_auto_is_one_step_on_cpu_and_the_log_interval_on_accelerators():
    assert setup_lib.steps_per_dispatch(0, 50, "cpu") == 1
    assert setup_lib.steps_per_dispatch(0, 50, "gpu") == 50
    assert setup_lib.steps_per_dispatch(0, 20, "tpu") == 20
    assert setup_lib.steps_per_dispatch(7, 50, "cpu") == 7


def _setup(config, workdir):
    run = setup_lib.setup(config, workdir)
    fresh = lambda: resume.initial_state(run)
    return run, fresh


def _bits(state, acc):
    return jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.step, acc)))


@pytest.mark.slow
def test_any_split_into_dispatches_and_any_resume_point_give_the_same_bits(tiny_config, tmp_path):
    config = variant(tiny_config, steps_per_dispatch=3, **{"data.limit_examples": 128})
    run, fresh = _setup(config, tmp_path)
    n = run.steps_per_epoch  # 4
    order = setup_lib.pipeline.epoch_permutation(run.key, 0, len(run.feed.train["label"]))

    def dispatched(ends):
        state, acc, start = fresh(), eval_steps.zero_sums(run.mesh, train=True), 0
        for stop in ends:
            state, acc = run.train_fn(state, acc, run.feed.train, order, start, stop)
            start = stop
        return _bits(state, acc)

    one_per_dispatch = dispatched(range(1, n + 1))
    for ends in ([n], [3, n]):
        for a, b in zip(one_per_dispatch, dispatched(ends), strict=True):
            np.testing.assert_array_equal(a, b)
    assert run.train_fn._cache_size() == 1  # one compilation for every count

    # The epoch loop resumed at batch 2 (a preemption checkpoint's Position, mid-dispatch)
    # ends with the bits of the uninterrupted epoch.
    writer = metrics_lib.Writer(tmp_path)
    straight = _bits(*loop.epoch_steps(run, fresh(), 0, writer, True)[:2])
    head, acc = run.train_fn(
        fresh(), eval_steps.zero_sums(run.mesh, train=True), run.feed.train, order, 0, 2
    )
    position = resume.Position(0, 2, acc)
    resumed = _bits(*loop.epoch_steps(run, head, 0, writer, False, resume_at=position)[:2])
    writer.close()
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
