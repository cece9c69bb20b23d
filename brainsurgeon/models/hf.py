"""Hugging Face causal language models in and out: a local folder (or a GGUF file, converted once to a plain
float32 folder), and the pruned model saved so that plain `transformers` reloads it."""
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..atomic import check_writable
from ..errors import BrainSurgeonError

TRANSFORMERS_HINT = "pip install transformers (and gguf accelerate for GGUF files)"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BrainSurgeonError(f"language models need the transformers package; {TRANSFORMERS_HINT}") from None
    transformers.utils.logging.set_verbosity_error()
    return transformers


def load_causal_lm(directory):
    """(model in eval mode, float32, on the CPU; tokenizer) from a local folder, never from a hub."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BrainSurgeonError(f"{directory} is no Hugging Face model folder (no config.json); convert a GGUF file "
                                "with 'brainsurgeon convert-gguf' or pass a folder written by save_pretrained")
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                  local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise BrainSurgeonError(f"cannot load the model in {directory}: {str(error).splitlines()[0]}") from None
    return model.eval(), tokenizer


def _publish_folder(build, target: Path) -> Path:
    """Run build(folder) on a scratch folder beside `target`, then move it into place: whole or nothing."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BrainSurgeonError(f"cannot write {target}: it exists and is not a folder; choose another path")
    check_writable(target.parent / ".brainsurgeon-probe")
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf_file, target) -> Path:
    """Dequantise a GGUF causal LM into a float32 Hugging Face folder (needs the gguf and accelerate packages)."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise BrainSurgeonError(f"GGUF file {gguf_file} not found")
    transformers = _transformers()

    def build(folder):
        kwargs = dict(gguf_file=gguf_file.name, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        # Dequantised: a plain float32 model, no longer a quantised one.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _publish_folder(build, target)


def save_pruned(model, tokenizer, result, target, report: dict) -> Path:
    """Write `model` (with `result` applied) with save_pretrained (safetensors), its tokenizer, the masks
    (masks.safetensors, uint8) and the report (brainsurgeon_report.json)."""
    from safetensors.torch import save_file

    def build(folder):
        result.apply(model)
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        save_file({name: mask.to(torch.uint8).contiguous() for name, mask in result.masks.items()},
                  str(folder / "masks.safetensors"))
        (folder / "brainsurgeon_report.json").write_text(json.dumps(report, indent=2) + "\n")

    return _publish_folder(build, target)
