"""ONNX export: every zoo family's ``model.onnx``, run in onnxruntime, answers as
``prediction.probabilities`` (what ``python -m cnnjax.predict`` computes) does, for a symbolic
batch; an operator the converter cannot express is one line naming it; the formats, metadata and
file layout. The command line end to end is in test_export.py (it reuses that module's trained
run)."""

import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from jax import lax

from cnnjax import models
from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import ConfigError
from cnnjax.nn.layers import batch_norm
from cnnjax.run.state import TrainState
from cnnjax.tools import export, onnx_writer
from cnnjax.tools import predict as prediction
from cnnjax.tools.export import ExportError

EPS32 = float(np.finfo(np.float32).eps)
SMALL = {"small_input": True}
RGB = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's mean and std
GREY = ((0.286,), (0.353,))  # Fashion-MNIST's
_G = (8, 4, 8, 4, 8, 8)  # a narrow inception block's widths
# (test id, registry name, model options, image (H, W, C)): every family at (about) the smallest
# input it takes. Families whose full size takes over ~5 s here (conversion traces the graph in
# Python, XLA compiles the calibration and the reference) run narrow, with the same module
# classes and so the same primitives; resnet18 at full width is in FULL_SIZE.
FAMILIES = [
    ("simple_cnn", "simple_cnn", {}, (28, 28, 1)),
    ("cifar_cnn", "cifar_cnn", {}, (28, 28, 1)),
    ("keras_cifar_cnn", "keras_cifar_cnn", {}, (32, 32, 3)),
    ("torch_small_cnn", "torch_small_cnn", {}, (28, 28, 1)),
    ("example_cnn", "example_cnn", {}, (28, 28, 1)),
    ("fast_cnn", "fast_cnn", {}, (32, 32, 3)),
    ("lenet5", "lenet5", {}, (32, 32, 1)),
    ("alexnet", "alexnet", SMALL, (32, 32, 3)),
    ("vgg11", "vgg11", SMALL, (32, 32, 3)),
    ("resnet20", "resnet20", {}, (32, 32, 3)),
    ("vgg11_bn_narrow", "vgg11_bn", {**SMALL, "stages": ((8,), (16,), (16, 16))}, (28, 28, 3)),
    ("resnet18_narrow", "resnet18", {**SMALL, "width": 8}, (32, 32, 3)),
    # Bottleneck blocks with a widened middle (Wide ResNet-50-2's), narrowed.
    ("wide_resnet50_2_narrow", "wide_resnet50_2", {**SMALL, "width": 8}, (32, 32, 3)),
    # The ImageNet stem (7x7/2 conv, padded 3x3/2 max pool), as torchvision's weights use it.
    ("resnet18_narrow_imagenet_stem", "resnet18", {"width": 8}, (64, 64, 3)),
    ("wrn_narrow", "wrn28_10", {"depth": 10, "widen_factor": 1}, (32, 32, 3)),
    (
        "densenet_narrow",
        "densenet121",
        {**SMALL, "growth_rate": 4, "block_config": (2, 2), "num_init_features": 8},
        (32, 32, 3),
    ),
    (
        "googlenet_narrow",  # both pool kinds between the inception blocks
        "googlenet",
        {**SMALL, "stem_widths": (8, 8, 16), "inceptions": (("i3", *_G), None, ("i4", *_G), None)},
        (32, 32, 3),
    ),
    (
        "mobilenet_v2_narrow",
        "mobilenet_v2",
        {**SMALL, "width_mult": 0.25, "settings": ((1, 16, 1, 1), (6, 24, 2, 2))},
        (32, 32, 3),
    ),
    (
        "efficientnet_narrow",
        "efficientnet_b0",
        {**SMALL, "width_mult": 0.25, "stages": ((1, 3, 1, 16, 1), (6, 5, 2, 24, 2))},
        (32, 32, 3),
    ),
    ("convnext_narrow", "convnext_tiny", {**SMALL, "depths": (1, 2), "dims": (8, 16)}, (32, 32, 3)),
]
# Full size, slow: the torchvision ImageNet layout at full width. Every family above also
# converted at full size (32 px, 64 px for the ImageNet stem; wide_resnet50_2's 67 M parameters
# included, max |difference| 2.4e-6) within its tolerance, at 6 to 66 s each here: too slow to
# keep them all in the suite.
FULL_SIZE = [
    ("resnet18_imagenet_stem", "resnet18", {}, (64, 64, 3)),
]


def _cases():
    for case_id, name, options, shape in FAMILIES:
        yield pytest.param(name, options, shape, id=case_id)
    for case_id, name, options, shape in FULL_SIZE:
        yield pytest.param(name, options, shape, id=case_id, marks=pytest.mark.slow)


def random_variables(model, shape, rng) -> dict:
    """Random variables of ``model`` without compiling its initialiser: kernels He-normal
    (variance 2 / fan-in, so ReLU stacks keep their scale), biases N(0, 0.1), scales U(0.5, 1.5);
    BatchNorm statistics mean 0, variance 1 (replaced by ``calibrated``)."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def draw(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if kind == "bias":
            return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        if kind in ("mean", "var"):
            return np.full(leaf.shape, float(kind == "var"), np.float32)
        return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)

    return flax.core.unfreeze(jax.tree_util.tree_map_with_path(draw, abstract))


def calibrated(model, variables, images, preprocess) -> dict:
    """``variables`` with BatchNorm statistics equal to the batch statistics of ``images``
    (N, H, W, C) uint8, and the classifier scaled so that their logits have standard deviation 1
    around each image's mean: statistics that are not an initialised model's identity, matched to
    the activations, and probabilities of other images far from one-hot, so the comparison sees
    the logits rather than a saturated softmax.

    One training-mode pass moves each statistic from s0 (mean 0, variance 1) to
    m * s0 + (1 - m) * batch, with cnnjax's BatchNorm momentum m; this solves for ``batch``.
    Eval mode with those statistics computes what that pass computed."""
    momentum = batch_norm(True).keywords["momentum"]
    x = preprocess.apply(images, jnp.float32)
    logits, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(
            lambda new, old: np.asarray((new - momentum * old) / (1 - momentum)),
            updates["batch_stats"],
            variables["batch_stats"],
        )
    spread = float(jnp.std(logits - logits.mean(axis=-1, keepdims=True)))
    head = variables["params"]["head"]["fc"]
    head["kernel"], head["bias"] = head["kernel"] / spread, head["bias"] / spread
    return variables


def reduction_lengths(model, variables, shape) -> list[int]:
    """The number of products each convolution and matrix product of the forward pass sums:
    kernel height x width x input channels per group, or the contracted size."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(x)
    lengths = []
    for eqn in _equations(jaxpr.jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            lengths.append(int(np.prod(rhs)) // rhs[out_dim])
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            lengths.append(int(np.prod([lhs[d] for d in contracting])))
    return lengths


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def tolerance(lengths) -> float:
    """Largest |probability difference| allowed between onnxruntime and XLA for a network whose
    convolutions and matrix products sum ``lengths`` products each, in float32.

    Both run the same float32 operations; their kernels sum the products in other orders (and
    evaluate exp, erf, tanh with other polynomials). Reordering a sum of n terms moves it by
    about sqrt(n) float32 eps relative to its terms (rounding errors add as a random walk; see
    test_export.ATOL). Each layer passes the error of its input on about unchanged (He weights
    and BatchNorm statistics matched to the activations keep every layer's gain near 1), so the
    errors of the layers add: eps * sum(sqrt(n)) relative to the logits, whose spread is 1
    (``calibrated``), so |logit error| <= 4 eps * sum(sqrt(n)) for logits within 4 of their
    mean. Softmax halves a logit error in the probabilities (|dp_i| <= max_j |dz_j| / 2), which
    lie in [0, 1]: 2 eps * sum(sqrt(n)). A wrong graph (a transposed layout, a missing
    normalisation) is off by more than 1e-2."""
    return 2 * EPS32 * float(np.sum(np.sqrt(lengths)))


@pytest.mark.parametrize("name,options,shape", list(_cases()))
def test_family_exports_to_onnx_as_predict_computes(name, options, shape, tmp_path):
    rng = np.random.default_rng(0)
    model = models.get(name, num_classes=10, **options)
    mean, std = RGB if shape[-1] == 3 else GREY
    preprocess = Preprocess.normalize_only(mean, std)
    calibration = rng.integers(0, 256, (16, *shape), np.uint8)
    variables = calibrated(model, random_variables(model, shape, rng), calibration, preprocess)
    out = tmp_path / "export"
    meta = export.export_model(
        model,
        variables,
        shape,
        mean,
        std,
        [f"class{k}" for k in range(10)],
        out,
        formats=("onnx",),
        source={"model": {"name": name}},
    )
    session = ort.InferenceSession(str(out / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    (images_input,) = session.get_inputs()
    assert images_input.name == "images" and images_input.type == "tensor(uint8)"
    assert isinstance(images_input.shape[0], str)  # symbolic batch
    assert images_input.shape[1:] == list(shape)

    # As many images as the export's probe, with its arguments: JAX reuses that compilation.
    images = rng.integers(0, 256, (onnx_writer.PROBE_BATCH, *shape), np.uint8)
    state = TrainState.for_inference(model.apply, variables)
    float32 = jnp.dtype("float32")
    expected = np.asarray(prediction.probabilities(state, images, preprocess, float32, False))
    assert expected.max() < 0.99  # not saturated: the comparison sees the logits
    atol = tolerance(reduction_lengths(model, variables, shape))
    for n in (1, len(images)):  # the batch is symbolic
        (got,) = session.run(["probabilities"], {"images": images[:n]})
        assert got.shape == (n, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[:n], rtol=0, atol=atol)
    difference = float(np.abs(got - expected).max())
    probe = meta["onnx"]["probe_max_abs_difference"]
    print(f"{name} {shape}: max |difference| {difference:.3g}, probe {probe:.3g}, atol {atol:.3g}")
    assert probe <= atol


def test_every_model_class_is_covered():
    """Each registered model is built by a module class some case above converts, so no family
    goes untested."""
    cases = FAMILIES + FULL_SIZE
    covered = {type(models.get(name, **options)) for _, name, options, _ in cases}
    registered = {type(models.get(name)) for name in models.names()}
    assert registered <= covered, sorted(c.__name__ for c in registered - covered)


class _Pools(nn.Module):
    """A tiny network with one pooling ``op``, a zero-padded channel shortcut and a head."""

    op: str = "max"

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3), name="conv")(x)  # a 1.7 KiB kernel
        if self.op == "max":  # overlapping, padded: reduce_window_max
            x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        else:  # reduce_window_min, which jax2onnx 0.17 has no lowering for
            x = nn.pooling.pool(x, jnp.inf, lax.min, (2, 2), (2, 2), "VALID")
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (2, 2)))  # lax.pad, as the CIFAR ResNets
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _pools(op):
    """A ``_Pools`` model, its variables and its image shape."""
    model, shape = _Pools(op), (8, 8, 3)
    return model, model.init(jax.random.key(0), jnp.zeros((1, *shape))), shape


def _export_pools(op, out, **kwargs):
    model, variables, shape = _pools(op)
    return export.export_model(
        model, variables, shape, *RGB, list("abc"), out, formats=("onnx",), **kwargs
    )


def test_an_operator_jax2onnx_cannot_convert_is_one_line(tmp_path):
    out = tmp_path / "export"
    source = {"model": {"name": "min_pool_net"}}
    with pytest.raises(ExportError) as error:
        _export_pools("min", out, source=source)
    message = str(error.value)
    assert message.startswith("onnx: min_pool_net uses reduce_window_min, which jax2onnx 0.17")
    assert "cannot convert" in message and "\n" not in message
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_the_rewrites_are_what_make_pooling_and_padding_convert(tmp_path, monkeypatch):
    """The two jax2onnx 0.17 failures onnx_writer works around, reproduced without the
    workarounds: each is one line naming the operator; with them the model converts."""
    meta = _export_pools("max", tmp_path / "with")
    model, variables, shape = _pools("max")
    atol = tolerance(reduction_lengths(model, variables, shape))
    assert meta["onnx"]["probe_max_abs_difference"] <= atol
    monkeypatch.setattr(onnx_writer, "_REWRITES", {"pad": onnx_writer._pad_by_concatenation})
    with pytest.raises(ExportError, match=r"^onnx: _Pools uses MaxPool, .* cannot run \("):
        _export_pools("max", tmp_path / "no_pool_rewrite")
    monkeypatch.setattr(
        onnx_writer, "_REWRITES", {"reduce_window_max": onnx_writer._spatial_max_pool}
    )
    with pytest.raises(ExportError, match=r"^onnx: _Pools uses pad, which jax2onnx .* convert"):
        _export_pools("max", tmp_path / "no_pad_rewrite")


def test_formats_metadata_and_describe(tmp_path):
    """StableHLO and ONNX together, from a run that resizes grey 12 px images to RGB 16 px (as a
    run from torchvision weights does): the metadata names each file, ``describe`` lists them, and
    both artifacts answer alike."""
    model = models.get("example_cnn", num_classes=4)
    preprocess = Preprocess(RGB[0], RGB[1], size=16, channels=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    out = tmp_path / "both"
    meta = export.export_model(
        model,
        variables,
        (12, 12, 1),
        *RGB,
        list("abcd"),
        out,
        formats=("onnx", "stablehlo"),
        platforms=("cpu",),
        preprocess=preprocess,
    )
    assert meta["formats"] == ["stablehlo", "onnx"]
    assert meta["artifacts"] == {"stablehlo": "model.stablehlo", "onnx": "model.onnx"}
    assert meta["onnx"]["opset"] == onnx_writer.OPSET == 17
    assert meta["onnx"]["files"] == ["model.onnx"]
    assert {"jax2onnx_version", "onnx_version", "onnxruntime_version"} <= set(meta["onnx"])
    assert json.loads((out / export.METADATA_FILE).read_text()) == meta
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [export.METADATA_FILE, "model.onnx", "model.stablehlo"]
    )
    assert export.describe(out, meta).splitlines() == [
        "exported: uint8 (N, 12x12x1) -> 4 class probabilities",
        f"  {out / 'model.stablehlo'}  (StableHLO for JAX, lowered for cpu)",
        f"  {out / 'model.onnx'}  (ONNX opset 17)",
        f"  {out / export.METADATA_FILE}",
    ]
    graph = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version == 17
    images = np.random.default_rng(1).integers(0, 256, (3, 12, 12, 1), np.uint8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"images": images})
    lengths = reduction_lengths(model, variables, (16, 16, 3))
    np.testing.assert_allclose(got, export.load(out)(images), rtol=0, atol=tolerance(lengths))


def test_weights_over_the_protobuf_limit_go_to_a_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_writer, "SINGLE_FILE_LIMIT", 0)
    meta = _export_pools("max", tmp_path / "external")
    assert meta["onnx"]["files"] == ["model.onnx", "model.onnx.data"]
    assert meta["artifacts"] == {"onnx": "model.onnx", "onnx_data": "model.onnx.data"}
    assert (tmp_path / "external" / "model.onnx.data").stat().st_size > 0


def test_an_onnx_only_export_has_no_stablehlo_to_load(tmp_path):
    _export_pools("max", tmp_path / "onnx_only")
    with pytest.raises(ExportError, match="has no StableHLO artifact .formats: onnx."):
        export.load(tmp_path / "onnx_only")


def test_format_choices():
    assert export.check_formats() == ("stablehlo", "saved_model")
    assert export.check_formats(saved_model=False) == ("stablehlo",)
    assert export.check_formats("onnx, stablehlo") == ("stablehlo", "onnx")
    with pytest.raises(ConfigError, match="unknown export format tflite; choose from"):
        export.check_formats(["tflite"])
    with pytest.raises(ConfigError, match="--nosaved_model refuses it"):
        export.check_formats(["saved_model", "onnx"], saved_model=False)
    with pytest.raises(ConfigError, match="no export format given"):
        export.check_formats([])


def test_missing_onnx_packages_are_one_line_naming_the_extra(tmp_path, monkeypatch):
    real = onnx_writer.importlib.util.find_spec
    monkeypatch.setattr(
        onnx_writer.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "jax2onnx" else real(name, *a),
    )
    with pytest.raises(ExportError) as error:
        _export_pools("max", tmp_path / "none")
    assert str(error.value) == f"--format=onnx needs jax2onnx: {onnx_writer.INSTALL}"
    assert "pip install 'cnnjax[onnx]'" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_bfloat16_model_is_refused_naming_the_operator(tmp_path):
    """onnxruntime's CPU kernels take no bfloat16 convolution: a bfloat16 run exports to the
    other formats, not to ONNX, and says which operator stops it."""
    model, shape = models.get("example_cnn", num_classes=3, dtype=jnp.bfloat16), (28, 28, 1)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
    with pytest.raises(ExportError) as error:
        export.export_model(
            model,
            variables,
            shape,
            *GREY,
            list("abc"),
            tmp_path / "o",
            formats=("onnx",),
            dtype="bfloat16",
        )
    message = str(error.value)
    assert message.startswith("onnx: ExampleCNN uses ") and "cannot run" in message
    assert message.split()[3].rstrip(",") in onnx_operators()
    assert list(tmp_path.iterdir()) == []


def onnx_operators() -> set[str]:
    """The ONNX operator names of the default domain."""
    return {schema.name for schema in onnx.defs.get_all_schemas()}
