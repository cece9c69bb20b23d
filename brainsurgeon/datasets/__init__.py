"""Datasets: MNIST, CIFAR-10, the bundled digits, and text for language models."""
