"""The one exception type users see: every message names the problem and the fix."""
import functools
import sys
import warnings
from pathlib import Path

import torch


class BrainSurgeonError(ValueError):
    """Bad input or an impossible request; the message says what to change."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (a library's own error may run to many lines)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


PACKAGE = str(Path(__file__).parent)


def warn_deprecated(message: str) -> None:
    """A FutureWarning pointing at the caller's line: the first frame outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, FutureWarning, stacklevel=level)


class FewSamplesWarning(UserWarning):
    """Fewer calibration samples than a Fisher method should be given (README: Safety)."""


def solver_errors_as_one_line(function):
    """Decorate an entry point so that a failed factorisation (a curvature that is singular or not finite, which the
    checks before it did not catch) reaches the user as one BrainSurgeonError naming the fix."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except torch.linalg.LinAlgError as error:
            raise BrainSurgeonError(f"a curvature solve failed ({first_line(error)[:160]}): the curvature is singular "
                                    "or not finite; raise the damping, or rescale the calibration inputs") from None
    return wrapped
