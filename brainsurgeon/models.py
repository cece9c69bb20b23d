"""Models of the benchmarks and their checkpoint loaders."""
from pathlib import Path

import torch
from torch import nn

from .errors import BrainSurgeonError


class MLPNet(nn.Module):
    """The WoodFisher/CBS MNIST MLP: 784-40-20-10, ReLU, no biases."""

    def __init__(self, sizes=(784, 40, 20, 10)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1], bias=False)
        self.fc2 = nn.Linear(sizes[1], sizes[2], bias=False)
        self.fc3 = nn.Linear(sizes[2], sizes[3], bias=False)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def _read_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise BrainSurgeonError(f"checkpoint {path} not found; pass --checkpoint with an existing file")
    try:
        # The WoodFisher checkpoints hold python objects (configs, schedulers): trusted research files.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise BrainSurgeonError(f"cannot read checkpoint {path}: {error}") from error


def extract_state_dict(checkpoint) -> dict:
    """The tensors of a checkpoint: plain state_dict, or under 'state_dict'/'model_state_dict'.

    Strips DataParallel's 'module.' prefix and the WoodFisher mask wrapper ('._layer.'), drops masks.
    """
    for key in ("model_state_dict", "state_dict"):
        if isinstance(checkpoint, dict) and key in checkpoint:
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise BrainSurgeonError("checkpoint holds no state_dict; save model.state_dict() or a dict with 'state_dict'")
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor) or key.endswith("_weight_mask"):
            continue
        key = key.removeprefix("module.").replace("._layer.", ".")
        state[key] = value
    return state


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint into `model`, with an error naming every mismatched key or shape."""
    state = extract_state_dict(_read_checkpoint(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise BrainSurgeonError(
            f"checkpoint {path} does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}; pick the --model the checkpoint was trained as"
        )
    model.load_state_dict(state)
    return model.eval()


MODELS = {"mlpnet": MLPNet}


def build_model(name: str, checkpoint=None) -> nn.Module:
    if name not in MODELS:
        raise BrainSurgeonError(f"unknown model '{name}'; choose from {sorted(MODELS)}")
    model = MODELS[name]()
    return load_checkpoint(model, checkpoint) if checkpoint else model.eval()
