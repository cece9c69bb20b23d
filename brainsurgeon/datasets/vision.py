"""Dataset readers (no torchvision): MNIST idx files, scikit-learn's bundled digits for the demo."""
import gzip
import hashlib
import os
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import validation
from ..atomic import atomic_path
from ..errors import BrainSurgeonError
from ..models.loading import load_plain_pickle

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
        num_samples = validation.count("calibration samples", num_samples)
        seed = validation.seed(seed)
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
    validation.input_file(path, "dataset file", validation.MAX_DATA_FILE_BYTES)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(validation.MAX_DATA_FILE_BYTES + 1)  # a gzip bomb stops at the cap
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise BrainSurgeonError(f"{path} is corrupt or truncated ({error}); download it again") from None
    if len(raw) > validation.MAX_DATA_FILE_BYTES:
        raise BrainSurgeonError(f"{path} decompresses to more than {validation.MAX_DATA_FILE_BYTES // 2**30} GiB; "
                                "pass the canonical MNIST files")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
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
        if target.exists() or target.is_symlink():
            raise BrainSurgeonError(f"{target} exists but is not the canonical MNIST file (md5 differs); move it "
                                    "away and run again")
        with atomic_path(target) as partial:
            try:
                urllib.request.urlretrieve(mirror + name, partial)
            except (OSError, ValueError) as error:  # URLError is an OSError
                raise BrainSurgeonError(f"cannot download {mirror + name} ({error}); copy the four files into "
                                        f"{directory} by hand where there is no network") from None
            if _md5(partial) != md5:
                raise BrainSurgeonError(f"downloaded {name} has the wrong md5; try another mirror")
    return directory


def normalise_mnist(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> flattened to 784 and normalised as in the paper."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(len(images), 784)


def checked_split(source, images: np.ndarray, labels: np.ndarray, image_shape: tuple, classes: int):
    """Images and labels as tensors, refusing counts that differ, images of another shape, labels out of range."""
    if images.ndim != 1 + len(image_shape) or tuple(images.shape[1:]) != image_shape:
        raise BrainSurgeonError(f"{source}: images of shape {tuple(images.shape[1:])}, expected {image_shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise BrainSurgeonError(f"{source}: {len(images)} images but {labels.size} labels; the files do not belong "
                                "together")
    if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
        raise BrainSurgeonError(f"{source}: labels outside 0..{classes - 1}")
    images = np.require(images, requirements=("C", "W"))  # a writable copy only where the reader's buffer is not
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_mnist(data_dir=None, trust_pickle: bool = False) -> Dataset:
    """MNIST from the canonical idx files, flattened to 784 and normalised as in the paper (no pickles:
    `trust_pickle` is accepted for a uniform signature)."""
    directory = resolve_data_dir(data_dir)
    arrays = {name: read_idx(_find_mnist_file(directory, name)) for name in MNIST_FILES}
    splits = [checked_split(f"MNIST {prefix} files in {directory}", arrays[f"{prefix}-images-idx3-ubyte.gz"],
                            arrays[f"{prefix}-labels-idx1-ubyte.gz"], (28, 28), 10) for prefix in ("train", "t10k")]
    (train_images, train_labels), (test_images, test_labels) = splits
    return Dataset("mnist", train_images, train_labels, normalise_mnist(test_images), test_labels, normalise_mnist)


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


def read_cifar_batch(path: Path, trust_pickle: bool = False):
    """One python-pickle batch: (N x 3 x 32 x 32 uint8, N labels), read as plain data (loading.py). File md5s
    are not checked on purpose (data/README.md)."""
    batch = load_plain_pickle(path, trust_pickle, what="CIFAR-10 batch")
    if not isinstance(batch, dict):
        raise BrainSurgeonError(f"CIFAR-10 batch {path} is not a dict with 'data' and 'labels'")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except KeyError as error:
        raise BrainSurgeonError(f"CIFAR-10 batch {path} has no {error} entry") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.dtype.kind not in "iu":
        raise BrainSurgeonError(f"CIFAR-10 batch {path}: expected uint8 data of N x 3072 and integer labels, got "
                                f"{data.dtype} {data.shape} and {labels.dtype} labels")
    return checked_split(f"CIFAR-10 batch {path}", data.reshape(-1, 3, 32, 32), labels, (3, 32, 32), 10)


def normalise_cifar(images: torch.Tensor) -> torch.Tensor:
    """(x/255 - 0.5) / 0.5 per channel: what the shared ResNet20 checkpoint was trained with."""
    return (images.float() / 255.0 - 0.5) / 0.5


def load_cifar10(data_dir=None, trust_pickle: bool = False) -> Dataset:
    """CIFAR-10 from the python batches; evaluates on whatever test_batch the folder holds."""
    folder = _find_cifar_folder(resolve_data_dir(data_dir))
    train = [read_cifar_batch(folder / name, trust_pickle) for name in CIFAR_TRAIN if (folder / name).is_file()]
    if not train:
        raise BrainSurgeonError(f"no training batches data_batch_1..5 in {folder}; calibration needs them")
    test_images, test_labels = read_cifar_batch(folder / "test_batch", trust_pickle)
    return Dataset("cifar10", torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]),
                   normalise_cifar(test_images), test_labels, normalise_cifar)


DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, data_dir=None, trust_pickle: bool = False) -> Dataset:
    if name not in DATASETS:
        raise BrainSurgeonError(f"unknown dataset '{name}'; choose from {sorted(DATASETS)}")
    return DATASETS[name](data_dir, trust_pickle)


def accuracy(model, inputs, targets, batch_size=2048) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            correct += int((model(inputs[start : start + batch_size]).argmax(1) == targets[start : start + batch_size]).sum())
    return 100.0 * correct / len(inputs)
