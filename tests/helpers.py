"""What the tests share: tiny models and data built from a config (nothing is downloaded), and the assertion that
two results are the same prune."""
from pathlib import Path

import numpy as np
import torch


def tiny_problem(seed=0, n=12, sizes=((3, 4), (2, 3))):
    """A small bias-free MLP and calibration data."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(i, o, bias=False) for i, o in sizes]
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), *layers[1:]).eval()
    inputs = torch.randn(n, sizes[0][0])
    targets = torch.randint(0, sizes[-1][1], (n,))
    return model, inputs, targets


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


def assert_same_result(first, second, atol=None):
    """The same masks, and the same new weights (exactly, or within `atol`), layer for layer."""
    assert list(first.masks) == list(second.masks)
    for name in first.masks:
        assert torch.equal(first.masks[name], second.masks[name]), name
        if atol is None:
            assert torch.equal(first.weights[name], second.weights[name]), name
        else:
            assert torch.allclose(first.weights[name], second.weights[name], atol=atol), name
