import gzip
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from brainsurgeon.models.vision import MLPNet

# CI runs the same examples every time: a failure there is reproducible, never a flake of the draw.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; under CI=true its absence is a failure, elsewhere a skip."""
    if not (SHARED_DATA / "mnist").is_dir():
        message = f"{SHARED_DATA} is missing: the end-to-end tests need the shared MNIST data and checkpoints"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture
def mnist_like(tmp_path):
    """A tiny MNIST folder in the idx format and a matching random MLPNet checkpoint."""
    generator = torch.Generator().manual_seed(0)

    def write_idx(name, array):
        header = bytes([0, 0, 8, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write(header + array.numpy().tobytes())

    for prefix, count in (("train", 300), ("t10k", 100)):
        write_idx(f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8))
        write_idx(f"{prefix}-labels-idx1-ubyte.gz", torch.randint(0, 10, (count,), generator=generator, dtype=torch.uint8))
    checkpoint = tmp_path / "mlp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in MLPNet().state_dict().items()}}, checkpoint)
    return tmp_path, checkpoint
