"""Test-wide setup: 4 fake CPU devices (set before JAX initialises) and shared fixtures."""

import os

# Several devices on one CPU, so sharding is tested everywhere; and compile options that cut
# XLA:CPU compile time for test-sized graphs. (Adding --xla_backend_optimization_level=0 to these
# two made the 4-device train step disagree with the 1-device one on jaxlib 0.10.2: left out.)
# Must precede the first JAX use.
TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=4 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_data_dir(tmp_path_factory):
    """A TFDS data_dir with the real Fashion-MNIST prepared offline from the Debian files."""
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        pytest.fail(
            f"{DEBIAN_FASHION_MNIST} is missing: apt-get install dataset-fashion-mnist "
            "(.ci/run installs it)"
        )
    from cnnjax.data import tfds as tfds_lib

    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_lib.builder("fashion_mnist", str(data_dir))
    return str(data_dir)


@pytest.fixture
def tiny_config(fmnist_data_dir):
    """The ``tiny`` preset reading the offline Fashion-MNIST."""
    from cnnjax import configs

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    return config


def variant(config, **overrides):
    """A copy of ``config`` with ``overrides`` (dotted keys reach into groups: "model.name")."""
    c = config.copy_and_resolve_references()
    c.update_from_flattened_dict(overrides)
    return c


def assert_one_line_error(result, *fragments):
    """A finished subprocess that failed with exit status 2 and one ``error:`` line holding
    every fragment, and no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
