"""No hang without a network: downloads, Inception weights and online W&B fail within seconds with advice."""

from __future__ import annotations

import time

import pytest
from tiny import (
    calmwild,
    subprocess_env,
    write_config,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ===== 7. no hangs without a network ==================================================================================


def test_cifar10_download_without_network_fails_fast_with_advice(tmp_path):
    """The real URL: offline it fails on the name lookup or the connection, bounded by download_timeout."""
    from calmwild.data import CIFAR10DataModule

    data = CIFAR10DataModule(root=str(tmp_path / "cifar"), download=True, num_train=10, num_heldout=10, batch_size=2,
                             download_timeout=10.0)
    start = time.perf_counter()
    try:
        data.prepare_data()
    except ConnectionError as error:
        elapsed = time.perf_counter() - start
        message = str(error)
    else:
        pytest.skip("this machine can download CIFAR-10: the offline path cannot be exercised")
    print(f"CIFAR-10 offline download failed after {elapsed:.2f} s")
    assert elapsed < 30
    assert "could not download CIFAR-10" in message and "cifar-10-batches-py" in message and "root=" in message


def test_cifar10_download_from_a_silent_address_is_cut_by_the_timeout(tmp_path, monkeypatch):
    """A blackholed address (TEST-NET-1, RFC 5737: never routed) either fails at once (no route) or times out."""
    import calmwild.data.cifar10 as cifar10

    monkeypatch.setattr(cifar10, "CIFAR10_URL", "http://192.0.2.1/cifar-10-python.tar.gz")
    data = cifar10.CIFAR10DataModule(root=str(tmp_path / "cifar"), download=True, download_timeout=3.0,
                                     num_train=10, num_heldout=10, batch_size=2)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="could not download CIFAR-10.*network timeout 3 s"):
        data.prepare_data()
    assert time.perf_counter() - start < 15


def test_missing_inception_weights_fail_fast_with_the_file_to_provide(tmp_path, monkeypatch):
    features = pytest.importorskip("calmwild.features", reason="calmwild.features is not importable yet")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no weights there
    start = time.perf_counter()
    try:
        features.build_feature_extractor("inception")
    except Exception as error:  # InceptionWeightsUnavailable
        elapsed, message = time.perf_counter() - start, str(error)
    else:
        pytest.skip("the Inception weights could be downloaded: the offline path cannot be exercised")
    print(f"missing Inception weights refused after {elapsed:.2f} s")
    assert elapsed < 15
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "weights_path" in message
    assert str(tmp_path / "torch_home") in message


WANDB_LOGGER = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "calmwild-test"}}]


@pytest.mark.slow
@pytest.mark.parametrize("base_url", [None, "https://192.0.2.1"], ids=["default-server", "blackholed-server"])
def test_online_wandb_without_network_fails_within_seconds_with_advice(tmp_path, base_url):
    config = write_config(tmp_path / "wandb.yaml", **{"trainer.logger": WANDB_LOGGER, "trainer.max_steps": 2})
    env = subprocess_env()
    env.pop("WANDB_MODE", None)  # online, as a user's shell would be
    if base_url:
        env["WANDB_BASE_URL"] = base_url
    start = time.perf_counter()
    done = calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs")],
                    cwd=tmp_path, env=env, timeout=120, check=False)
    elapsed = time.perf_counter() - start
    print(f"online W&B without network refused after {elapsed:.1f} s (process start included)")
    assert done.returncode != 0 and elapsed < 15 + 10  # 15 s budget for the check, ~5-10 s to start Python here
    assert "W&B server cannot be reached" in done.stdout and "WANDB_MODE=offline" in done.stdout
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.slow
def test_online_wandb_without_network_can_fall_back_to_offline(tmp_path):
    config = write_config(tmp_path / "wandb.yaml", **{"trainer.logger": WANDB_LOGGER, "trainer.max_steps": 2})
    env = subprocess_env()
    env.pop("WANDB_MODE", None)
    done = calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs"),
                     "--wandb_offline_fallback=true"], cwd=tmp_path, env=env, timeout=180)
    assert "logging offline" in done.stdout
    assert list((tmp_path / "runs").glob("run-*/wandb/offline-run-*/run-*.wandb"))
