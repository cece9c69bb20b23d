"""Dataset readers (no torchvision): MNIST idx files, scikit-learn's bundled digits for the demo."""
import gzip
import hashlib
import os
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import BrainSurgeonError

DATA_ENV = "BRAINSURGEON_DATA"


def _unchanged(inputs: torch.Tensor) -> torch.Tensor:
    return inputs


@dataclass
class Dataset:
    """A train and a test split with integer labels. The test inputs are normalised; the training inputs stay
    as stored (uint8 for images: a quarter of the memory of CIFAR-10 as float32) and `prepare` normalises the
    samples actually drawn."""

    name: str
    train_inputs: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor] = _unchanged

    @property
    def num_train(self) -> int:
        return len(self.train_inputs)

    def train_split(self):
        """The whole training split, normalised."""
        return self.prepare(self.train_inputs), self.train_y

    def calibration(self, num_samples: int, seed: int):
        """A seeded random subset of the training split, normalised."""
        if num_samples > self.num_train:
            raise BrainSurgeonError(f"not enough training samples: {num_samples} requested, {self.num_train} exist")
        index = torch.randperm(self.num_train, generator=torch.Generator().manual_seed(seed))[:num_samples]
        return self.prepare(self.train_inputs[index]), self.train_y[index]


MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def resolve_data_dir(data_dir=None) -> Path:
    data_dir = data_dir or os.environ.get(DATA_ENV)
    if not data_dir:
        raise BrainSurgeonError(f"no data directory; pass --data-dir or set {DATA_ENV}")
    return Path(data_dir)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BrainSurgeonError(f"{path} is not a uint8 idx file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BrainSurgeonError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find_mnist_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / "mnist" / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise BrainSurgeonError(f"MNIST file {name} not found in {directory}; pass the folder holding the idx files "
                            "or run 'brainsurgeon download-mnist DIR' where a network exists")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def download_mnist(directory, mirror: str = MNIST_MIRROR) -> Path:
    """Fetch the four canonical MNIST files into `directory`, verifying their md5s (needs a network)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_FILES.items():
        target = directory / name
        if target.is_file() and _md5(target) == md5:
            continue
        partial = target.with_suffix(".part")
        urllib.request.urlretrieve(mirror + name, partial)
        if _md5(partial) != md5:
            partial.unlink()
            raise BrainSurgeonError(f"downloaded {name} has the wrong md5; try another mirror")
        partial.replace(target)
    return directory


def normalise_mnist(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> flattened to 784 and normalised as in the paper."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(len(images), 784)


def load_mnist(data_dir=None) -> Dataset:
    """MNIST from the canonical idx files, flattened to 784 and normalised as in the paper."""
    directory = resolve_data_dir(data_dir)
    arrays = {name: torch.from_numpy(read_idx(_find_mnist_file(directory, name)).copy()) for name in MNIST_FILES}
    return Dataset(
        "mnist",
        arrays["train-images-idx3-ubyte.gz"],
        arrays["train-labels-idx1-ubyte.gz"].long(),
        normalise_mnist(arrays["t10k-images-idx3-ubyte.gz"]),
        arrays["t10k-labels-idx1-ubyte.gz"].long(),
        normalise_mnist,
    )


def load_digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images, shipped inside the package): 3/4 train, 1/4 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = len(x) * 3 // 4
    return Dataset("digits", x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]])


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _find_cifar_folder(directory: Path) -> Path:
    for candidate in (directory, directory / CIFAR_FOLDER, directory / "cifar10" / CIFAR_FOLDER):
        if (candidate / "test_batch").is_file():
            return candidate
    raise BrainSurgeonError(f"no CIFAR-10 python batches (test_batch, data_batch_1..5) in {directory}; "
                            f"pass the folder holding {CIFAR_FOLDER}")


def read_cifar_batch(path: Path):
    """One python-pickle batch: (N x 3 x 32 x 32 uint8, N labels). File md5s are not checked on purpose."""
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch["labels"], dtype=np.int64)


def normalise_cifar(images: torch.Tensor) -> torch.Tensor:
    """(x/255 - 0.5) / 0.5 per channel: what the shared ResNet20 checkpoint was trained with."""
    return (images.float() / 255.0 - 0.5) / 0.5


def load_cifar10(data_dir=None) -> Dataset:
    """CIFAR-10 from the python batches; evaluates on whatever test_batch the folder holds."""
    folder = _find_cifar_folder(resolve_data_dir(data_dir))
    train = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN if (folder / name).is_file()]
    if not train:
        raise BrainSurgeonError(f"no training batches data_batch_1..5 in {folder}; calibration needs them")
    test_images, test_labels = read_cifar_batch(folder / "test_batch")
    return Dataset(
        "cifar10",
        torch.from_numpy(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        normalise_cifar(torch.from_numpy(test_images)),
        torch.from_numpy(test_labels),
        normalise_cifar,
    )


DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, data_dir=None) -> Dataset:
    if name not in DATASETS:
        raise BrainSurgeonError(f"unknown dataset '{name}'; choose from {sorted(DATASETS)}")
    return DATASETS[name](data_dir)


def accuracy(model, inputs, targets, batch_size=2048) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            correct += int((model(inputs[start : start + batch_size]).argmax(1) == targets[start : start + batch_size]).sum())
    return 100.0 * correct / len(inputs)
