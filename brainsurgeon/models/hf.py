"""Hugging Face causal language models in and out: a local folder (or a GGUF file, converted once to a plain
float32 folder), and the pruned model saved so that plain `transformers` reloads it. Every failure of the
libraries underneath (transformers, tokenizers, safetensors, gguf, torch's weights-only unpickler) is one
BrainSurgeonError naming the file."""
import contextlib
import io
import json
import pickle
import sys
from pathlib import Path

import torch

from .. import validation
from ..atomic import outputs
from ..errors import BrainSurgeonError, first_line

TRANSFORMERS_HINT = "pip install transformers (and gguf accelerate for GGUF files)"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
GGUF_MAGIC = b"GGUF"
PROBE_TOKENS = 8  # the causality probe's sequence length


def _transformers(progress: bool = False):
    """transformers with its logging at errors only, and its progress bars (and huggingface_hub's) shown only
    when asked and stderr is a terminal."""
    try:
        import transformers
    except ImportError:
        raise BrainSurgeonError(f"language models need the transformers package; {TRANSFORMERS_HINT}") from None
    transformers.utils.logging.set_verbosity_error()
    shown = _shown(progress)
    (transformers.utils.logging.enable_progress_bar if shown else transformers.utils.logging.disable_progress_bar)()
    return transformers


def _shown(progress: bool) -> bool:
    return progress and sys.stderr.isatty()


@contextlib.contextmanager
def _library_output(progress: bool):
    """Around calls into transformers: unless progress is shown, whatever they print on stderr is dropped (the GGUF
    reader draws a tqdm bar of its own that no switch of transformers turns off). Errors still raise."""
    if _shown(progress):
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _check_model_folder(directory: Path) -> None:
    """A folder with a config.json, whose weight files are regular files under the size cap."""
    if not directory.is_dir():
        raise BrainSurgeonError(f"{directory} is no Hugging Face model folder (not a folder); convert a GGUF file "
                                "with 'brainsurgeon convert-gguf' or pass a folder written by save_pretrained")
    if not (directory / "config.json").exists():
        raise BrainSurgeonError(f"{directory} is no Hugging Face model folder (no config.json); convert a GGUF file "
                                "with 'brainsurgeon convert-gguf' or pass a folder written by save_pretrained")
    validation.input_file(directory / "config.json", "model config", validation.MAX_TEXT_BYTES)
    for path in directory.iterdir():
        if path.name.endswith(WEIGHT_SUFFIXES):
            validation.input_file(path, "model weights", validation.MAX_MODEL_FILE_BYTES)


def _load_failure(what: str, path, error: BaseException, fix: str) -> BrainSurgeonError:
    if isinstance(error, pickle.UnpicklingError):
        return BrainSurgeonError(f"cannot load {what} {path}: its weights hold Python objects that weights-only "
                                 "loading refuses (brainsurgeon never runs code from a model file); convert the "
                                 "weights to safetensors with a tool you trust")
    return BrainSurgeonError(f"cannot load {what} {path}: {first_line(error)[:300]}; {fix}")


def load_causal_lm(directory, progress: bool = False, dtype: torch.dtype = torch.float32):
    """(model in eval mode, its weights in `dtype`, on the CPU; tokenizer) from a local folder, never from a hub. A
    model whose predictions depend on later tokens (an encoder such as BERT) is refused: perplexity needs a causal
    model."""
    directory = Path(directory)
    _check_model_folder(directory)
    transformers = _transformers(progress)
    try:
        with _library_output(progress):
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, local_files_only=True, output_loading_info=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except BrainSurgeonError:
        raise
    except Exception as error:  # transformers, tokenizers, safetensors and torch each raise their own kinds
        raise _load_failure("the model in", directory, error, "pass a folder written by save_pretrained") from None
    unfit = sorted(loading.get("missing_keys") or []) + [str(k) for k in loading.get("mismatched_keys") or []]
    if unfit:  # transformers would initialise them at random and go on
        raise BrainSurgeonError(f"the weights in {directory} do not fit its config.json: {len(unfit)} of the model's "
                                f"tensors are missing or misshapen (e.g. {unfit[0]}); pass the folder save_pretrained "
                                "wrote")
    check_causal(model.eval(), str(directory))
    return model, tokenizer


def check_causal(model, name: str) -> None:
    """Refuse `model` unless its logits at a position ignore every later token: two sequences that differ only in
    their last token must give the same logits before it."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise BrainSurgeonError(f"{name}: the config names no vocabulary size; pass a causal language model")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    try:
        with torch.no_grad():
            logits = [model(input_ids=batch, use_cache=False).logits[0, :-1] for batch in (ids, changed)]
    except Exception as error:
        raise BrainSurgeonError(f"{name}: the model cannot run on token ids ({first_line(error)}); pass a causal "
                                "language model") from None
    if not torch.allclose(*logits, rtol=1e-4, atol=1e-4 * float(logits[0].abs().max().clamp_min(1))):
        raise BrainSurgeonError(f"{name} ({type(model).__name__}) is not a causal language model: its predictions "
                                "depend on later tokens, so perplexity and the layer-wise prune of causal models do "
                                "not apply; pass a decoder-only model")


def convert_gguf(gguf_file, target, overwrite: bool = False, progress: bool = False) -> Path:
    """Dequantise a GGUF causal LM into a new float32 Hugging Face folder (needs the gguf and accelerate
    packages). `target` must not exist (or, with `overwrite`, be a folder brainsurgeon wrote)."""
    gguf_file = validation.input_file(gguf_file, "GGUF file", validation.MAX_MODEL_FILE_BYTES)
    with open(gguf_file, "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise BrainSurgeonError(f"{gguf_file} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf "
                                    "model file")
    with outputs(overwrite) as staged:
        folder = staged.folder(target, inputs=[gguf_file])
        transformers = _transformers(progress)
        kwargs = dict(gguf_file=gguf_file.name, local_files_only=True)
        try:
            with _library_output(progress):
                model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32,
                                                                          **kwargs)
                tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        except BrainSurgeonError:
            raise
        except Exception as error:
            raise _load_failure("GGUF file", gguf_file, error, "pass a GGUF file of a causal language model "
                                "that transformers supports") from None
        # Dequantised: a plain float32 model, no longer a quantised one.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
        save_model_folder(folder, model, tokenizer, progress)
    return Path(target)


def save_model_folder(folder: Path, model, tokenizer, progress: bool = False) -> None:
    """save_pretrained of the model and the tokenizer; a failed write of either is an OSError (the caller's
    `outputs` turns it into one line and removes the scratch)."""
    try:
        with _library_output(progress):
            model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
    except (BrainSurgeonError, OSError):
        raise
    except Exception as error:  # safetensors' and tokenizers' own error types
        raise OSError(first_line(error)) from None


def write_pruned_folder(folder: Path, model, tokenizer, result, report: dict) -> None:
    """Into an empty (scratch) folder: `model` with `result` applied (save_pretrained, safetensors), its tokenizer,
    the masks (masks.safetensors, uint8) and the report (brainsurgeon_report.json)."""
    from safetensors.torch import save_file

    result.apply(model)
    save_model_folder(folder, model, tokenizer)
    save_file({name: mask.to(torch.uint8).contiguous() for name, mask in result.masks.items()},
              str(folder / "masks.safetensors"))
    (folder / "brainsurgeon_report.json").write_text(json.dumps(report, indent=2) + "\n")


def save_pruned(model, tokenizer, result, target, report: dict, overwrite: bool = False, inputs=()) -> Path:
    """Write the pruned model's folder `target` whole (write_pruned_folder). `target` must not exist (or, with
    `overwrite`, be a folder brainsurgeon wrote) and must not overlap `inputs` (the model's own folder)."""
    with outputs(overwrite) as staged:
        write_pruned_folder(staged.folder(target, inputs), model, tokenizer, result, report)
    return Path(target)
