import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

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


def tiny_problem(seed=0, n=12, sizes=((3, 4), (2, 3))):
    """A small bias-free MLP and calibration data."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(i, o, bias=False) for i, o in sizes]
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), *layers[1:]).eval()
    inputs = torch.randn(n, sizes[0][0])
    targets = torch.randint(0, sizes[-1][1], (n,))
    return model, inputs, targets
