"""Rematerialisation (``config.remat``): the same parameters, forward pass, BatchNorm updates and
gradients as without it, in a compiled train step that needs less memory.

The tests' XLA_FLAGS (conftest) lack the trainer's CPU flag that keeps jax.checkpoint's
barriers (``cnnjax.cli.CPU_FLAGS``), so every compilation here asks for it: without it XLA:CPU
merges the recomputation back into the forward pass, and these tests would compare a program
with itself.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import cli, configs, models
from cnnjax.configs import validation
from cnnjax.errors import ConfigError
from cnnjax.models.common import REMAT_CHOICES, REMAT_POLICIES, remat_policy
from cnnjax.models.resnet import ResNet
from cnnjax.nn.layers import BottleneckBlock, ResidualBlock
from cnnjax.run.state import abstract_train_state, create_train_state, init_variables
from cnnjax.train import setup as setup_lib
from cnnjax.train import steps

KEEP_BARRIERS = {"xla_disable_hlo_passes": cli.CPU_FLAGS["xla_disable_hlo_passes"]}
POLICIES = ["blocks", "blocks:dots_saveable", "blocks:dots_with_no_batch_dims_saveable"]
BATCH, SIZE = 4, 16

# Tiny members of four families at 16 px. The ResNets are the ``resnet18`` / ``resnet50`` class
# with one block per stage (the second with a projection shortcut).
TINY = {
    "resnet_basic": lambda remat: ResNet(
        (1, 1), ResidualBlock, num_classes=10, width=4, small_input=True, remat=remat
    ),
    "resnet_bottleneck": lambda remat: ResNet(
        (1, 1), BottleneckBlock, num_classes=10, width=4, small_input=True, remat=remat
    ),
    # Two inverted residuals with identity shortcuts, the first without expansion.
    "mobilenet_v2": lambda remat: models.get(
        "mobilenet_v2",
        10,
        remat=remat,
        small_input=True,
        width_mult=0.25,
        settings=((1, 8, 1, 1), (6, 8, 1, 1)),
    ),
    # Dense layers take ``train`` (a static argument under remat) and drop out at 0.3: the
    # recomputation must draw the masks the forward pass drew.
    "densenet121": lambda remat: models.get(
        "densenet121",
        10,
        remat=remat,
        small_input=True,
        growth_rate=4,
        block_config=(2,),
        num_init_features=8,
        bn_size=2,
        drop_rate=0.3,
    ),
}
# (family, remat) pairs. The policy is applied by the one helper every family shares; the
# families differ in how they call their blocks (train as a static argument, dropout rngs).
# dots_with_no_batch_dims_saveable keeps only Dense outputs, which none of these blocks has: it
# compiles to blocks' program (test_policy_without_dense_layers_is_blocks), so it runs once.
CASES = [
    *[("resnet_basic", r) for r in POLICIES],
    *[(f, r) for f in ("resnet_bottleneck", "mobilenet_v2", "densenet121") for r in POLICIES[:2]],
]


@functools.cache
def initial_state(family: str):
    """A TrainState of the family's plain model (rbg keys: XLA:CPU compiles threefry slowly)."""
    model = TINY[family]("none")
    key = jax.random.key(0, impl="rbg")
    create = lambda k: create_train_state(model, optax.sgd(0.1), k, (SIZE, SIZE, 3))
    return jax.jit(create)(key)


@functools.cache
def step_results(family: str, remat: str, options: tuple = tuple(KEEP_BARRIERS.items())):
    """``(grads, (loss (N,), logits, batch_stats updates), compiled program)`` of one
    training-mode ``steps.loss_and_grads`` on a fixed batch, the model rematerialised as
    ``remat`` says, the parameters those of ``initial_state``, compiled with ``options``."""
    state = initial_state(family).replace(apply_fn=TINY[family](remat).apply)
    key = jax.random.key(1, impl="rbg")
    batch = {
        "image": jax.random.normal(jax.random.key(2), (BATCH, SIZE, SIZE, 3)),
        "label": jnp.arange(BATCH) % 10,
    }
    fn = functools.partial(steps.loss_and_grads, label_smoothing=0.1)
    compiled = jax.jit(fn).lower(state, batch, key).compile(compiler_options=dict(options))
    grads, forward = compiled(state, batch, key)
    return grads, forward, program(compiled)


def program(compiled) -> str:
    """The optimised HLO of ``compiled`` without source locations (which name the call sites):
    no ``metadata={...}`` and none of the FileNames ... StackFrames tables."""
    tables = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
    parts = compiled.as_text().split("\n\n")
    text = "\n\n".join(p for p in parts if not p.startswith(tables))
    return re.sub(r",? metadata=\{[^}]*\}", "", text)


@pytest.mark.slow  # 1-3.5 s each on 2 quiet cores, 3-10 s busy: compiling a training step
@pytest.mark.parametrize("family, remat", CASES)
def test_same_forward_batch_stats_and_gradients(family, remat):
    want_grads, want_forward, plain_hlo = step_results(family, "none")
    grads, forward, hlo = step_results(family, remat)
    assert hlo != plain_hlo  # rematerialised in the compiled step, not merged away
    if remat == "blocks":  # nothing kept: the blocks' convolutions run a second time
        assert _convolutions(hlo) > _convolutions(plain_hlo)
    # The forward pass runs once either way, on the same values: loss, logits and the new
    # BatchNorm statistics are bit-identical.
    jax.tree.map(np.testing.assert_array_equal, forward, want_forward)
    # The backward pass recomputes the same float32 operations, but XLA may fuse it
    # differently around a recomputed block, which reorders float32 reductions (BatchNorm's and
    # the kernels' sums over N*H*W). A reordered n-term sum differs by at most ~n*eps times the
    # magnitude of its terms (Higham's gamma_n), taken here as the largest gradient. Observed:
    # exact, or 0.54 eps * max|g| (DenseNet; 4 eps on a ResNet-18 of width 4). A wrong
    # recomputation moves them far more: DenseNet's gradients under another dropout mask differ
    # by 13% of max|g|, 10^6 eps.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    tolerance = BATCH * SIZE * SIZE * np.finfo(np.float32).eps * scale
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=tolerance), grads, want_grads
    )


@pytest.mark.slow  # 0.7 s after the gradient tests, ~5 s alone on 2 busy cores
def test_policy_without_dense_layers_is_blocks_and_the_cpu_flag_alone_changes_nothing():
    blocks = step_results("resnet_basic", "blocks")[2]
    assert step_results("resnet_basic", "blocks:dots_with_no_batch_dims_saveable")[2] == blocks
    # The trainer's CPU flag only keeps barriers; a step without remat has none.
    plain = step_results("resnet_basic", "none")[2]
    assert step_results("resnet_basic", "none", options=())[2] == plain


# One tiny member of every family with repeated blocks: (attributes, number of blocks).
FAMILIES = {
    "resnet20": ({"width": 4}, 9),
    "mobilenet_v2": ({"small_input": True, "settings": ((1, 8, 1, 1), (6, 8, 1, 1))}, 2),
    "efficientnet_b0": (
        {"small_input": True, "width_mult": 0.25, "stages": ((1, 3, 1, 16, 1), (6, 3, 1, 16, 1))},
        2,
    ),
    "densenet121": ({"small_input": True, "growth_rate": 4, "block_config": (2,)}, 2),
    "googlenet": (
        {
            "small_input": True,
            "stem_widths": (8, 8, 8),
            "inceptions": (("inception3a", 4, 4, 4, 4, 4, 4), ("inception3b", 4, 4, 4, 4, 4, 4)),
        },
        2,
    ),
    "convnext_tiny": ({"small_input": True, "depths": (1, 1), "dims": (8, 16)}, 2),
    "wrn28_10": ({"depth": 10, "widen_factor": 1}, 3),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_rematerialises_each_block_in_the_backward_pass(name):
    """Traced only: a training-mode gradient holds one rematerialised call per block (those
    taking ``train`` get it as a static argument, else tracing it would fail)."""
    attributes, blocks = FAMILIES[name]
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)

    def remat_calls(remat):
        model = models.get(name, 10, remat=remat, **attributes)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)

        def loss(params, batch_stats, x):
            logits, _ = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)},
            )
            return logits.sum()

        stats = variables.get("batch_stats", {})
        jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], stats, x)
        return sum(e.primitive.name.startswith(("remat", "checkpoint")) for e in jaxpr.eqns)

    assert remat_calls("none") == 0
    assert remat_calls("blocks:dots_saveable") == blocks


def _convolutions(hlo: str) -> int:
    # XLA:CPU compiles a 1x1 convolution as a dot.
    return hlo.count(" convolution(") + hlo.count(" dot(")


def _shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_variable_paths_and_shapes_are_unchanged(name):
    """Checkpoints and pretrained weights load into a rematerialised model unchanged."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

    def variables(remat):
        model = models.get(name, 10, remat=remat, small_input=True)
        return jax.eval_shape(model.init, jax.random.key(0), x)

    want = _shapes(variables("none"))
    for remat in ("blocks", "blocks:dots_saveable"):  # the policy does not touch the variables
        assert _shapes(variables(remat)) == want, remat


def test_initial_values_are_unchanged():
    plain = initial_state("resnet_basic")
    init = lambda k: init_variables(TINY["resnet_basic"]("blocks"), k, (SIZE, SIZE, 3))
    variables = jax.jit(init)(jax.random.key(0, impl="rbg"))  # initial_state's key
    want = {"params": plain.params, "batch_stats": plain.batch_stats}
    jax.tree.map(np.testing.assert_array_equal, variables, want)


def test_choices_and_policies():
    assert remat_policy("none") is None
    assert remat_policy("blocks") is remat_policy("blocks:nothing_saveable")
    assert remat_policy("blocks") is jax.checkpoint_policies.nothing_saveable
    for name in REMAT_POLICIES:
        assert remat_policy(f"blocks:{name}") is getattr(jax.checkpoint_policies, name)
    # config.remat sets it, never config.model.remat.
    assert all("remat" not in models.options(n) for n in models.names())


@pytest.mark.parametrize("value", ["model", "blocks:", "blocks:everything", "Blocks", "", None])
def test_a_bad_value_is_one_line_listing_the_valid_ones(value):
    config = configs.get("default")
    with config.ignore_type():
        config.remat = value
    with pytest.raises(ConfigError) as e:
        validation.check(config)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--config.remat={value} must be one of")
    assert all(choice in message for choice in REMAT_CHOICES)


def test_blocks_for_a_model_without_blocks_is_refused_before_anything_runs():
    config = configs.get("default")
    config.model.name = "vgg11"
    config.remat = "blocks:dots_saveable"
    with pytest.raises(ConfigError) as e:
        setup_lib.check(config)
    assert str(e.value) == (
        "--config.remat=blocks:dots_saveable: model 'vgg11' has no repeated blocks to "
        "rematerialise; use --config.remat=none"
    )
    config.model.name = "resnet20"
    setup_lib.check(config)
    assert setup_lib.build_model(config, 10).remat == "blocks:dots_saveable"


def _temp_bytes(remat: str) -> int:
    """Scratch bytes of a ResNet's whole train step (a 3x3 stem and three basic blocks at
    32 px, batch 16), compiled (not run) with the state donated as the trainer does."""
    model = ResNet((3,), ResidualBlock, num_classes=10, width=8, small_input=True, remat=remat)
    state = abstract_train_state(model, optax.sgd(0.1), jax.random.key(0), (32, 32, 3))
    batch = {
        "image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32),
    }
    jitted = jax.jit(steps.train_step, donate_argnums=(0,))
    compiled = jitted.lower(state, batch, jax.random.key(1)).compile(compiler_options=KEEP_BARRIERS)
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # 4 s on 2 quiet cores, 10-13 s busy: two compilations of a train step
def test_blocks_need_less_step_memory():
    plain, remat = _temp_bytes("none"), _temp_bytes("blocks")
    # Without remat each block keeps ~5 activations of the input's size for the backward pass
    # (two convolution outputs, the first's activation, the sum, the mask of the last ReLU);
    # with it only its input, plus one block's ~5 while that block is recomputed. With the
    # stem's ~3: 3 + 3 * 5 = 18 against 3 + 3 + 5 = 11, about 0.6.
    assert remat < 0.75 * plain, (remat, plain)
