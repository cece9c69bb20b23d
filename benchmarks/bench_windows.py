"""The language-model bench's model and windows, as the scripts beside this file load them: SmolLM2-135M from
models/ (make lm-install), 64 calibration and 32 evaluation windows of 512 Wikipedia tokens, seed 0."""
from pathlib import Path
from types import SimpleNamespace

from brainsurgeon.cli_lm import load_language_model

FOLDER = "models/SmolLM2-135M-Instruct"
NAME = Path(FOLDER).name


def load_bench_model() -> tuple:
    """(model, calibration windows, evaluation windows), the model fresh and dense on every call."""
    text = SimpleNamespace(hf_model=FOLDER, quiet=True, seq_len=512, text="wiki", calib_seqs=64, eval_windows=32,
                           seed=0)
    model, _, calibration, evaluation = load_language_model(text)
    return model, calibration, evaluation
