"""Progress on stderr for long work (tqdm): silent when asked, and when stderr is not a terminal (a log file)."""
import sys

from tqdm.auto import tqdm


def progress_bar(iterable, description: str, enabled: bool = True, total=None):
    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, desc=description, total=total, disable=not shown, file=sys.stderr, leave=False)
