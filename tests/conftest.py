import gzip
import os
from pathlib import Path

import numpy as np
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


def tiny_problem(seed=0, n=12, sizes=((3, 4), (2, 3))):
    """A small bias-free MLP and calibration data."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(i, o, bias=False) for i, o in sizes]
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), *layers[1:]).eval()
    inputs = torch.randn(n, sizes[0][0])
    targets = torch.randint(0, sizes[-1][1], (n,))
    return model, inputs, targets


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


def lm_folder(root: Path, model, name: str = "tiny-lm"):
    """`model` with a 92-word word-level tokenizer saved as a Hugging Face folder under `root`, and a text file of
    60 paragraphs to prune on: (folder, text file)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(90)]
    vocab = {word: index for index, word in enumerate(["<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    folder = root / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = np.random.default_rng(0)
    paragraphs = [" ".join(rng.choice(words, size=40)) for _ in range(60)]
    text = root / "text.txt"
    text.write_text("\n\n".join(paragraphs))
    return folder, text


def tiny_llama(layers=3, hidden=32, seed=0):
    """A randomly initialised Llama with grouped-query attention, small enough for unit tests."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()
