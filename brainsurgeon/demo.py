"""The embedded default: real data shipped inside scikit-learn (8x8 digits), a small MLP trained in seconds."""
import torch
from torch import nn

from .datasets.vision import Dataset, load_digits_dataset


def train_digits_mlp(dataset: Dataset, seed: int = 0, epochs: int = 300) -> nn.Module:
    """A 64-64-32-10 ReLU MLP trained full-batch with Adam (about 97% test accuracy, a few seconds)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, labels = dataset.train_split()
    for _ in range(epochs):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimiser.step()
    return model.eval()


def demo_setup(seed: int = 0):
    dataset = load_digits_dataset(seed)
    return train_digits_mlp(dataset, seed), dataset
