"""Models of the benchmarks and their checkpoint loaders."""
import torch
from torch import nn

from ..errors import BrainSurgeonError
from .loading import load_torch_file


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


def _mismatch(stored: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why a stored tensor cannot stand for the model's: another shape, or integers where floats belong (an
    int64 copy of float weights would load truncated)."""
    if stored.shape != expected.shape:
        return f"{tuple(stored.shape)} vs model {tuple(expected.shape)}"
    if stored.is_floating_point() != expected.is_floating_point() or stored.is_complex():
        return f"dtype {stored.dtype} vs model {expected.dtype}"
    return None


def load_checkpoint(model: nn.Module, path, trust_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into `model` (tensors and plain data only unless `trust_pickle`: see loading.py), with
    an error naming every mismatched key, shape or dtype."""
    state = extract_state_dict(load_torch_file(path, trust_pickle))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {why}" for k, v in expected.items() if k in state and (why := _mismatch(state[k], v))]
    if missing or unexpected or wrong:
        raise BrainSurgeonError(
            f"checkpoint {path} does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes or dtypes {wrong[:5]}; pick the --model the checkpoint was "
            "trained as"
        )
    model.load_state_dict(state)
    return model.eval()


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: two 3x3 conv+BN, identity or 1x1-conv+BN shortcut, ReLU after the sum."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet20(nn.Module):
    """CIFAR ResNet20: 3 stages x 3 basic blocks (16, 32, 64 channels), global average pool, fc."""

    # The paper's protocol prunes the 18 convolutions inside the residual blocks; stem, shortcuts, fc stay dense.
    default_prunable = (r"^layer\d\.\d\.conv[12]$",)

    def __init__(self, num_classes=10, blocks=(3, 3, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inplanes = [], 16
        for index, (planes, count) in enumerate(zip((16, 32, 64), blocks)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(inplanes if b == 0 else planes, planes, stride if b == 0 else 1)
                                          for b in range(count)]))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


MODELS = {"mlpnet": MLPNet, "resnet20": ResNet20}


def build_model(name: str, checkpoint=None, trust_pickle: bool = False) -> nn.Module:
    if name not in MODELS:
        raise BrainSurgeonError(f"unknown model '{name}'; choose from {sorted(MODELS)}")
    model = MODELS[name]()
    return load_checkpoint(model, checkpoint, trust_pickle) if checkpoint else model.eval()
