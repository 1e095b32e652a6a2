"""Smoke tests of the experiment scripts' pure helpers (no training, no timing assertions)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import benchmark  # noqa: E402
import time_to_accuracy as tta  # noqa: E402


def _res(ips, **kw):
    base = {"ips": ips, "first_step_s": 2.0, "warmup_s": 3.0, "peak_rss_mb": 500.0}
    return {**base, **kw}


def test_benchmark_args_defaults_and_quick():
    args = benchmark.parse_args([])
    assert args.models == ["simple_cnn", "resnet20"]
    assert (args.rounds, args.steps) == (3, 30)
    assert args.peers == ["torch", "torch_compile", "keras"]
    quick = benchmark.parse_args(["--quick", "--models", "simple_cnn"])
    assert (quick.rounds, quick.steps, quick.peers) == (1, 3, ["torch"])


def test_round_order_alternates():
    fws = ["cnnjax", "torch"]
    orders = [benchmark.round_order(fws, r) for r in range(4)]
    assert [x for o in orders for x in o] == ["cnnjax", "torch", "torch", "cnnjax"] * 2


def test_bench_config_matches_the_spec():
    c = benchmark.bench_config("resnet20", None)
    assert (c.model.name, c.batch_size, c.optimizer, c.nesterov) == ("resnet20", 128, "sgd", True)
    assert (c.label_smoothing, c.schedule, c.data.validation_fraction) == (0.0, "constant", 0.1)
    c = benchmark.bench_config("simple_cnn", "/data")
    assert (c.optimizer, c.learning_rate, c.data.data_dir) == ("adam", 1e-3, "/data")


def test_time_steps_counts_only_the_timed_window():
    calls = []
    out = benchmark.time_steps(calls.append, lambda: None, warmup=2, steps=5)
    assert calls == list(range(7))
    assert out["ips"] > 0 and out["peak_rss_mb"] > 0


def test_paired_ratio_is_the_median_of_same_round_ratios():
    a = [_res(300), _res(100), {"error": "x"}]
    b = [_res(100), _res(100), _res(50)]
    assert benchmark.paired_ratio(a, b) == pytest.approx(2.0)  # median of 3.0 and 1.0
    assert benchmark.paired_ratio([{"error": "x"}], b) is None


def test_summarize_and_table():
    results = {
        ("simple_cnn", "cnnjax"): [
            _res(400, flops_per_image=20e6, peak_gflops={"jnp.dot": 40.0}),
            _res(600, flops_per_image=20e6, peak_gflops={"jnp.dot": 50.0}),
        ],
        ("simple_cnn", "torch"): [_res(200, peak_gflops={"torch.mm": 45.0}), _res(200)],
        ("simple_cnn", "keras"): [{"error": "ImportError: no keras"}],
    }
    rows = {r["framework"]: r for r in benchmark.summarize(results)}
    assert rows["cnnjax"]["ips"] == 500 and rows["cnnjax"]["ratio"] == 1.0
    assert rows["torch"]["ratio"] == pytest.approx(2.5)  # median of 2.0 and 3.0
    assert rows["cnnjax"]["mfu"] == pytest.approx(500 * 20e6 / 50e9)  # best peak of the run
    assert rows["keras"]["note"].startswith("ImportError")
    table = benchmark.format_table(list(rows.values()))
    assert "2.50x" in table and "skipped: ImportError" in table and "20%" in table
    footer = benchmark.format_footer(results, list(rows.values()))
    assert "jnp.dot 50 GFLOP/s" in footer and "torch.mm 45" in footer and "20.0 M" in footer


def test_tta_args_and_command():
    args = tta.parse_args(["--override", "num_epochs=8", "--cold-cache"])
    assert (args.target, args.budget_s, args.config, args.cold_cache) == (
        0.93,
        60.0,
        "default",
        True,
    )
    cmd = tta.train_command("default", "/tmp/w", ["num_epochs=8", "config.data.limit_examples=5"])
    assert cmd[-5:] == [
        "--config=default",
        "--workdir=/tmp/w",
        "--config.test_every_epoch=True",
        "--config.num_epochs=8",
        "--config.data.limit_examples=5",
    ]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tta.train_command("default", "/tmp/w", ["num_epochs"])


def test_line_reader_waits_for_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = tta.LineReader(path)
    assert reader.new_lines() == []
    path.write_text(json.dumps({"epoch": 1}) + "\n" + '{"epoch": ')
    assert reader.new_lines() == [{"epoch": 1}]
    with path.open("a") as f:
        f.write("2}\n")
    assert reader.new_lines() == [{"epoch": 2}]
    assert reader.new_lines() == []


def _lines(*tests):
    """metrics.jsonl lines with a test accuracy per epoch, one every 10 s from 11 s."""
    return [
        {"epoch": i + 1, "test_accuracy": a, "wall_s": 10.0 * (i + 1), "seen_s": 10.0 * i + 11}
        for i, a in enumerate(tests)
    ]


def test_first_crossing_and_verdict():
    lines = _lines(0.90, 0.931, 0.92, 0.94)
    assert tta.first_crossing(lines, "test_accuracy", 0.93)["epoch"] == 2
    v = tta.verdict(lines, 0.93, budget_s=60)
    assert (v["epoch"], v["seen_s"], v["epochs"], v["final_test_accuracy"]) == (2, 21.0, 4, 0.94)
    assert v["passed"]
    assert not tta.verdict(lines, 0.93, budget_s=20)["passed"]  # crossed too late
    assert tta.verdict(_lines(0.95, 0.92), 0.93, 60)["passed"]  # the first crossing counts
    missing = tta.verdict(_lines(0.5, 0.6), 0.93, 60)
    assert missing["epoch"] is None and not missing["passed"]
    report = tta.format_report(missing, 0.93, 60)
    assert "never reached" in report and "FAIL" in report
    assert "PASS" in tta.format_report(v, 0.93, 60)


# ------------------------------------------------------------------------- gpu_check / gpu_carry


def test_gpu_check_synthetic_test_split_shares_the_training_templates():
    """The test split is drawn around the training split's class templates: a classifier that
    knows only the training class means labels test images right (the first GPU run drew each
    split's templates from its own key and reached 0.15)."""
    import gpu_check

    split = gpu_check.synthetic_splits({"train": 300, "test": 200}, (4, 4, 3), 10, seed=3)
    assert split["test"]["image"].dtype == np.uint8 and split["test"]["image"].shape == (
        200,
        4,
        4,
        3,
    )
    x = split["train"]["image"].reshape(300, -1).astype(np.float32)
    y = split["train"]["label"]
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    test = split["test"]["image"].reshape(200, -1).astype(np.float32)
    nearest = np.argmin(((test[:, None] - means[None]) ** 2).sum(-1), 1)
    assert np.mean(nearest == split["test"]["label"]) > 0.9


def test_gpu_check_commands_and_flags():
    import gpu_check

    from cnnjax import cli

    root = Path(__file__).resolve().parent.parent
    for name in gpu_check.DEVICE_TESTS:  # the GPU image has no TensorFlow and no dataset
        text = (root / name).read_text()
        assert "fmnist_data_dir" not in text and "tensorflow" not in text, name
    cmd = gpu_check.tests_command(quick=False)
    assert cmd[cmd.index("not slow") - 1] == "-m" and cmd[-1] == gpu_check.DEVICE_TESTS[-1]
    flags = {k for f in gpu_check.CANDIDATE_FLAGS.values() for k in f}
    assert flags <= cli.FLAG_SUPPORT.keys()  # each with the jaxlibs that know it
    assert set(gpu_check.QUICK_CANDIDATES) <= gpu_check.CANDIDATE_FLAGS.keys()
    train = gpu_check.train_command("default", Path("/w"), Path("/d"), quick=False)
    assert train[2:] == [
        "cnnjax.train", "--config=default", "--workdir=/w", "--config.data.data_dir=/d",
        "--config.data.download=False",
    ]  # fmt: skip
    summary = gpu_check.pytest_summary("....\n2 failed, 120 passed, 3 skipped in 95.20s\n")
    assert summary == {"failed": 2, "passed": 120, "skipped": 3, "pytest_s": 95.2}


def test_gpu_check_table_reads_results_and_time_outs(tmp_path):
    import gpu_check

    (tmp_path / "fast.json").write_text(json.dumps({
        "data": {"train": 50000, "test": 10000}, "status": 0, "test_accuracy": 0.9876,
        "wall_s": 31.5, "train_images_per_sec": 440000.0,
    }))  # fmt: skip
    (tmp_path / "fast.status").write_text("0\n")
    (tmp_path / "flags.json").write_text(json.dumps({
        "none": {"images_per_sec": 100.0, "compile_s": 2.0, "model": "resnet20", "batch": 512,
                 "vs_none": 1.0},
        "deterministic": {"error": "boom"},
    }))  # fmt: skip
    (tmp_path / "resnet50.status").write_text("124\n")
    table = gpu_check.format_table(gpu_check.table_rows(gpu_check.load_results(tmp_path)))
    assert "test 98.76%, wall_s 31.5, 440,000 img/s" in table
    assert "100 img/s (1.00x of none), compile 2.0 s, resnet20 batch 512" in table
    assert "XLA flags: deterministic" in table and "failed: boom" in table
    assert "resnet50: stopped" in table and "exit status 124 (time limit)" in table
    assert "tests" in table and "not run" in table


def test_gpu_carry_wheels_and_splits():
    import gpu_carry

    assert gpu_carry.wheel_name(Path("tensorflow_datasets-4.9.10-py3-none-any.whl")) == (
        "tensorflow-datasets"
    )
    wheels = [Path("cnnjax-0.1.0-py3-none-any.whl"), Path("toml-0.10.2-py2.py3-none-any.whl")]
    wheels.append(Path("promise-2.3-py3-none-any.whl"))
    missing = gpu_carry.missing_wheels(wheels, is_installed=lambda name: name != "promise")
    assert [w.name.split("-")[0] for w in missing] == ["cnnjax", "promise"]

    class Split:
        def __init__(self, n):
            self.num_examples = n

    class Builder:
        class info:  # noqa: N801  (TFDS's attribute name)
            splits = {"train": Split(60000), "test": Split(10000)}

    assert gpu_carry.trainer_splits(Builder) == {"train[:54000]", "train[54000:]", "test"}
    assert "promise" in gpu_carry.SDIST_ONLY and "tensorflow-datasets" in gpu_carry.CARRY_PACKAGES
