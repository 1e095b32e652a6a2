"""Smoke tests of the experiment scripts' pure helpers (no training, no timing assertions)."""

import json
import sys
from pathlib import Path

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


def test_accelerator_check_parts():
    import accelerator_check as ac
    import jax
    import numpy as np

    root = Path(__file__).resolve().parent.parent
    for name in ac.DEVICE_INDEPENDENT_TESTS:  # no TFDS: the accelerator image has none
        text = (root / name).read_text()
        assert "fmnist_data_dir" not in text and "tfds" not in text, name
    split = ac.synthetic_split(jax.random.key(0), 64, (4, 4, 3), 10)
    assert split["image"].dtype == np.uint8 and split["image"].shape == (64, 4, 4, 3)
    # Each class has its own template: images of one class are closer to their class mean.
    x = np.asarray(split["image"], np.float32).reshape(64, -1)
    labels = np.asarray(split["label"])
    means = np.stack([x[labels == c].mean(0) for c in np.unique(labels)])
    nearest = np.unique(labels)[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1)]
    assert np.mean(nearest == labels) > 0.9
    config = ac.fast_config(quick=True, epochs=1)
    assert (config.dtype, config.model.name, config.num_epochs) == ("bfloat16", "fast_cnn", 1)
    assert ac.parse_args(["all", "--quick"]).steps == 2
