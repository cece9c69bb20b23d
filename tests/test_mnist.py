"""End to end on the real MLPNet checkpoint and MNIST from ../shared/data."""
import copy

import pytest

import brainsurgeon
from brainsurgeon import BrainSurgeonError
from brainsurgeon.datasets.vision import (
    MNIST_FILES,
    accuracy,
    download_mnist,
    load_mnist,
)
from brainsurgeon.models.vision import build_model


@pytest.fixture(scope="module")
def mlpnet(shared_data):
    model = build_model("mlpnet", shared_data / "checkpoints" / "mnist_25_epoch_93.97.ckpt")
    return model, load_mnist(shared_data / "mnist")


def test_dense_accuracy_is_the_checkpoints(mlpnet):
    model, mnist = mlpnet
    assert accuracy(model, mnist.test_x, mnist.test_y) == pytest.approx(93.97, abs=1e-9)


@pytest.mark.parametrize("sparsity, expected", [(0.5, 93.93), (0.9, 90.28), (0.98, 32.25)])
def test_magnitude_pruning_reproduces_the_paper(mlpnet, sparsity, expected):
    model, mnist = mlpnet
    result = brainsurgeon.prune(model, None, sparsity, "mp", progress=False)
    assert result.num_pruned == int(sparsity * 32360 + 0.5)
    assert accuracy(result.apply(copy.deepcopy(model)), mnist.test_x, mnist.test_y) == pytest.approx(expected, abs=0.02)


def test_cbs_beats_magnitude_at_high_sparsity(mlpnet):
    model, mnist = mlpnet
    calibration = mnist.calibration(2000, seed=0)
    mp = brainsurgeon.prune(model, None, 0.95, "mp", progress=False)
    cbs = brainsurgeon.prune(model, calibration, 0.95, "cbs", progress=False, init_trials=10)
    assert cbs.num_pruned == mp.num_pruned
    mp_acc = accuracy(mp.apply(copy.deepcopy(model)), mnist.test_x, mnist.test_y)
    cbs_acc = accuracy(cbs.apply(copy.deepcopy(model)), mnist.test_x, mnist.test_y)
    assert cbs_acc > mp_acc + 2.0


def test_download_verifies_md5s_against_a_mirror(shared_data, tmp_path):
    mirror = (shared_data / "mnist").as_uri() + "/"
    target = download_mnist(tmp_path / "mnist", mirror=mirror)
    assert load_mnist(target).calibration(60000, 0)[0].shape == (60000, 784)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in MNIST_FILES:
        (corrupt / name).write_bytes(b"not mnist")
    with pytest.raises(BrainSurgeonError, match="wrong md5"):
        download_mnist(tmp_path / "other", mirror=corrupt.as_uri() + "/")
    assert not list((tmp_path / "other").iterdir())  # nothing half-written
