"""Export for serving: both artifacts reloaded in a fresh process answer as the predictor does,
for several batch sizes (the batch is symbolic), with the run's EMA weights and flip TTA; the
metadata; replacing an export; one-line errors; ``--format=onnx`` from the command line. One tiny
run (EMA and flip TTA on) is trained and exported once for the module. Every zoo family's ONNX
export is in test_export_onnx.py."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line_error

from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import ConfigError
from cnnjax.run import trained
from cnnjax.tools import export
from cnnjax.tools import predict as prediction
from cnnjax.tools.export import ExportError

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 3, 8)
# Both artifacts run the predictor's float32 graph op for op (export_model calls
# prediction.probabilities); the compilations differ only in how XLA (jaxlib's here, the one
# bundled with TensorFlow for the SavedModel, under other XLA flags and batch sizes) orders and
# tiles the sums inside convolutions and dots. Reordering a float32 sum of n terms moves it by
# about sqrt(n) * 2**-24 * sum(|terms|) (rounding errors add as a random walk): for the longest
# reduction here, fc1's n = 7 * 7 * 64 = 3136, that is 3.3e-6 * sum(|terms|), and softmax's
# Jacobian halves a logit error in the probabilities (|dp_i| <= max_j |dz_j| / 2). With a
# logit's sum(|terms|) of a few units in this tiny run that is a few 1e-6: 1e-5 leaves room,
# and anything that really differs (other weights, no TTA) is off by more than 1e-2 (below).
ATOL = 1e-5

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    import tensorflow as tf
    from cnnjax.tools import export

    out, images_path, result_path, batches = sys.argv[1:]
    images = np.load(images_path)
    model = export.load(out)
    serve = tf.saved_model.load(f"{out}/saved_model").signatures["serving_default"]
    results = {}
    for n in map(int, batches.split(",")):
        results[f"stablehlo_{n}"] = model(images[:n])
        probabilities = serve(images=tf.constant(images[:n]))["probabilities"]
        results[f"saved_model_{n}"] = probabilities.numpy()
    (spec,) = serve.structured_input_signature[1].values()
    outputs = serve.structured_outputs
    signature = {
        "input": [spec.shape.as_list(), spec.dtype.name],
        "output": {k: [v.shape.as_list(), v.dtype.name] for k, v in outputs.items()},
        "symbolic_batch": jax.export.is_symbolic_dim(model.exported.in_avals[0].shape[0]),
    }
    np.savez(result_path, **results, signature=json.dumps(signature))
    """
)


def run_python(*args, timeout=300):
    """A fresh python in the repository root, with none of the test process's XLA flags."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(fmnist_data_dir, tmp_path_factory):
    """A trained tiny run that keeps an EMA and evaluates with flip TTA."""
    from cnnjax import configs
    from cnnjax.train import loop

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    config.num_epochs = 1  # 16 steps: the EMA (decay warmup to 0.9) still lags the params
    config.ema_decay = 0.9
    config.flip_tta = True
    workdir = tmp_path_factory.mktemp("tiny_ema_tta")
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def out(workdir, tmp_path_factory):
    """The run exported in this process (the command line is tested below)."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    export.export_run(workdir, out)
    return out


@pytest.fixture(scope="module")
def images(fmnist_data_dir):
    """The first Fashion-MNIST test images, uint8 (8, 28, 28, 1)."""
    from cnnjax.data import tfds as tfds_lib
    from cnnjax.data import tfds_source

    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    return tfds_source.load_arrays(builder, "test", limit=max(BATCHES))["image"]


@pytest.fixture(scope="module")
def fresh(out, images, tmp_path_factory):
    """Both artifacts' probabilities for each batch size, computed in a fresh process."""
    directory = tmp_path_factory.mktemp("fresh")
    np.save(directory / "images.npy", images)
    result_path = directory / "result.npz"
    result = run_python(
        "-c",
        FRESH_PROCESS,
        str(out),
        str(directory / "images.npy"),
        str(result_path),
        ",".join(map(str, BATCHES)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(result_path) as f:
        return {k: (json.loads(str(f[k])) if k == "signature" else f[k]) for k in f.files}


@pytest.fixture(scope="module")
def run(workdir):
    return trained.load_run(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["stablehlo", "saved_model"])
def test_artifacts_in_a_fresh_process_answer_as_the_predictor(fresh, workdir, images, artifact):
    predictor = prediction.load_predictor(workdir)
    diffs = []
    for n in BATCHES:
        got = fresh[f"{artifact}_{n}"]
        assert got.shape == (n, 10) and got.dtype == np.float32
        expected = predictor.predict(images[:n])
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
        diffs.append(float(np.abs(got - expected).max()))
    per_batch = dict(zip(BATCHES, diffs, strict=True))
    print(f"{artifact}: max |probability difference| per batch size {per_batch}")


@pytest.mark.slow
def test_saved_model_signature_and_symbolic_batch(fresh):
    assert fresh["signature"] == {
        "input": [[None, 28, 28, 1], "uint8"],
        "output": {"probabilities": [[None, 10], "float32"]},
        "symbolic_batch": True,
    }


@pytest.mark.slow
def test_export_uses_the_ema_weights_and_flip_tta(fresh, run, images):
    pre = run.preprocess
    exported = fresh[f"stablehlo_{max(BATCHES)}"]
    raw_params = run.state.replace(ema_params=None)
    variants = {
        "raw params": prediction.probabilities(raw_params, images, pre, jnp.float32, True),
        "no flip TTA": prediction.probabilities(run.state, images, pre, jnp.float32, False),
    }
    for name, probs in variants.items():
        assert np.abs(exported - np.asarray(probs)).max() > 1e-2, name


@pytest.mark.slow
def test_metadata(out, run):
    meta = json.loads((out / export.METADATA_FILE).read_text())
    assert meta["input"] == {
        "name": "images",
        "shape": [None, 28, 28, 1],
        "dtype": "uint8",
        "layout": "NHWC",
    }
    assert meta["output"]["shape"] == [None, 10]
    assert meta["class_names"] == list(run.info.class_names)
    assert meta["normalization"]["mean"] == list(run.info.mean)
    assert meta["platforms"] == list(export.PLATFORMS)
    assert meta["jax_version"] == jax.__version__
    assert meta["jaxlib_version"] == version("jaxlib")
    assert meta["step"] == run.step and meta["source"]["step"] == run.step
    assert meta["flip_tta"] is True
    assert meta["formats"] == ["stablehlo", "saved_model"]  # the default
    assert meta["artifacts"] == {"stablehlo": "model.stablehlo", "saved_model": "saved_model"}
    assert "6 months" in meta["compatibility"]
    loaded = export.load(out)
    assert loaded.class_names == run.info.class_names and loaded.step == run.step
    assert loaded.platforms == export.PLATFORMS


@pytest.mark.slow
def test_load_checks_the_images(out):
    model = export.load(out)
    assert model(np.zeros((0, 28, 28, 1), np.uint8)).shape == (0, 10)
    with pytest.raises(ConfigError, match="must be uint8"):
        model(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(ConfigError, match=r"must be \(N, 28, 28, 1\)"):
        model(np.zeros((2, 32, 32, 3), np.uint8))


@pytest.mark.slow
def test_damaged_exports_are_one_line_errors(out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / export.STABLEHLO_FILE).write_bytes(b"not a flatbuffer")
    with pytest.raises(ExportError, match="is corrupt"):
        export.load(copy)
    (copy / export.STABLEHLO_FILE).unlink()
    with pytest.raises(ExportError, match="is missing"):
        export.load(copy)
    (copy / export.METADATA_FILE).write_text("{")
    with pytest.raises(ExportError, match="is unreadable"):
        export.load(copy)
    with pytest.raises(ExportError, match="is not a cnnjax export"):
        export.load(tmp_path / "nothing")


@pytest.mark.slow
def test_reexport_replaces_and_a_failed_export_keeps_the_old(out, run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = (run.model, run.variables, run.input_shape, run.info.mean, run.info.std)
    with pytest.raises(ConfigError, match="10 outputs but 9 class names"):
        export.export_model(*args, run.info.class_names[:9], copy, saved_model=False)
    assert (copy / export.SAVED_MODEL_DIR).is_dir()  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    meta = export.export_model(
        *args, run.info.class_names, copy, platforms=("cpu",), saved_model=False
    )
    assert sorted(p.name for p in copy.iterdir()) == [export.METADATA_FILE, export.STABLEHLO_FILE]
    assert meta["platforms"] == ["cpu"] and export.load(copy).platforms == ("cpu",)


@pytest.mark.slow
def test_bad_arguments_are_refused_before_anything_is_written(run, tmp_path):
    args = (run.model, run.variables, run.input_shape)
    names = run.info.class_names
    with pytest.raises(ConfigError, match="mean and std need 1 entries"):
        export.export_model(*args, (0.5, 0.5, 0.5), (0.2,) * 3, names, tmp_path / "a")
    with pytest.raises(ConfigError, match="platforms must be some of"):
        export.export_model(*args, (0.5,), (0.2,), names, tmp_path / "a", platforms=("gpu",))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="non-empty directory without export.json"):
        export.export_model(*args, (0.5,), (0.2,), names, tmp_path / "busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


@pytest.mark.slow
def test_cli_missing_workdir_is_one_line(tmp_path):
    result = run_python(
        "-m", "cnnjax.export", f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}"
    )
    assert_one_line_error(result, "is not a cnnjax run directory (no config.json)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_out_that_is_a_file_is_one_line(workdir, tmp_path):
    (tmp_path / "model.bin").write_text("")
    result = run_python(
        "-m", "cnnjax.export", f"--workdir={workdir}", f"--out={tmp_path}/model.bin"
    )
    assert_one_line_error(result, "model.bin is a file; give a directory")


@pytest.mark.slow
def test_cli_exports(workdir, tmp_path):
    out = tmp_path / "cpu_only"
    args = ["--platforms=cpu", "--nosaved_model"]
    result = run_python("-m", "cnnjax.export", f"--workdir={workdir}", f"--out={out}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = trained.load_run(workdir)
    assert result.stdout.splitlines() == [
        f"exported step {run.step}: uint8 (N, 28x28x1) -> 10 class probabilities",
        f"  {out / export.STABLEHLO_FILE}  (StableHLO for JAX, lowered for cpu)",
        f"  {out / export.METADATA_FILE}",
    ]
    assert export.load(out).platforms == ("cpu",)


@pytest.mark.slow
def test_cli_exports_onnx_that_answers_as_the_predictor(workdir, images, tmp_path):
    """``--format=onnx`` end to end: the run's EMA weights and flip TTA in one model.onnx, which
    onnxruntime runs for every batch size as the predictor (``python -m cnnjax.predict``)
    computes. ATOL's derivation holds: onnxruntime runs the same float32 operations, its own
    kernels summing in other orders."""
    import onnxruntime as ort

    out = tmp_path / "onnx"
    args = [f"--workdir={workdir}", f"--out={out}", "--format=onnx"]
    result = run_python("-m", "cnnjax.export", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = trained.load_run(workdir)
    assert result.stdout.splitlines() == [
        f"exported step {run.step}: uint8 (N, 28x28x1) -> 10 class probabilities",
        f"  {out / export.ONNX_FILE}  (ONNX opset 17)",
        f"  {out / export.METADATA_FILE}",
    ]
    assert sorted(p.name for p in out.iterdir()) == [export.METADATA_FILE, export.ONNX_FILE]
    meta = json.loads((out / export.METADATA_FILE).read_text())
    assert meta["formats"] == ["onnx"] and meta["flip_tta"] is True
    session = ort.InferenceSession(str(out / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    predictor = prediction.load_predictor(workdir)
    diffs = {}
    for n in BATCHES:
        (got,) = session.run(["probabilities"], {"images": images[:n]})
        expected = predictor.predict(images[:n])
        assert got.shape == (n, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
        diffs[n] = float(np.abs(got - expected).max())
    print(f"onnx: max |probability difference| per batch size {diffs}")


@pytest.mark.slow
def test_cli_contradicting_formats_are_one_line(workdir, tmp_path):
    args = [f"--workdir={workdir}", f"--out={tmp_path / 'o'}"]
    result = run_python("-m", "cnnjax.export", *args, "--format=saved_model", "--nosaved_model")
    assert_one_line_error(result, "--format names saved_model but --nosaved_model refuses it")
    result = run_python("-m", "cnnjax.export", *args, "--format=tflite")
    assert_one_line_error(result, "unknown export format tflite; choose from stablehlo")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_saved_model_converts_to_tflite(out, workdir, images):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(out / export.SAVED_MODEL_DIR))
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    (image_input,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    batch = images[:3]
    interpreter.resize_tensor_input(image_input["index"], batch.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(image_input["index"], batch)
    interpreter.invoke()
    got = interpreter.get_tensor(output["index"])
    # TFLite's own float32 kernels: the same sums in another order, so ATOL's derivation holds.
    expected = prediction.load_predictor(workdir).predict(batch)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    print(f"tflite: max |probability difference| {np.abs(got - expected).max()}")


@pytest.mark.slow
def test_export_model_with_batch_norm_and_rgb_normalisation(tmp_path):
    """export_model on its own, as for pretrained weights: BatchNorm statistics (random, so that
    eval-mode BatchNorm is not the identity it is at init) and torchvision's RGB mean/std."""
    import tensorflow as tf

    from cnnjax import models
    from cnnjax.run.state import TrainState, init_variables

    model, shape = models.get("torch_small_cnn", num_classes=5), (16, 16, 3)
    variables = init_variables(model, jax.random.key(0), shape)
    rng = np.random.default_rng(0)

    def random_stat(path, x):
        is_var = path[-1].key == "var"
        return rng.uniform(0.5, 2.0, x.shape) if is_var else rng.normal(0, 0.5, x.shape)

    stats = jax.tree_util.tree_map_with_path(random_stat, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = tmp_path / "bn"
    export.export_model(model, variables, shape, mean, std, list("abcde"), out, platforms=("cpu",))
    images = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
    state = TrainState(step=0, apply_fn=model.apply, tx=None, opt_state=None, **variables)
    expected = prediction.probabilities(state, images, Preprocess.normalize_only(mean, std))
    serve = tf.saved_model.load(str(out / export.SAVED_MODEL_DIR)).signatures["serving_default"]
    got = {
        "stablehlo": export.load(out)(images),
        "saved_model": serve(images=tf.constant(images))["probabilities"].numpy(),
    }
    for name, probs in got.items():
        np.testing.assert_allclose(probs, np.asarray(expected), rtol=0, atol=ATOL, err_msg=name)
    init_stats = state.replace(
        batch_stats=init_variables(model, jax.random.key(0), shape)["batch_stats"]
    )
    unused = prediction.probabilities(init_stats, images, Preprocess.normalize_only(mean, std))
    assert np.abs(got["stablehlo"] - np.asarray(unused)).max() > 1e-2  # the statistics matter
