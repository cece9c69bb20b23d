"""Progress on stderr for long work (tqdm), silent when asked."""
import sys

from tqdm.auto import tqdm


def progress_bar(iterable, description: str, enabled: bool = True, total=None):
    return tqdm(iterable, desc=description, total=total, disable=not enabled, file=sys.stderr, leave=False)
