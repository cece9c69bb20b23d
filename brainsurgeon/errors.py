"""The one exception type users see: every message names the problem and the fix."""


class BrainSurgeonError(ValueError):
    """Bad input or an impossible request; the message says what to change."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (a library's own error may run to many lines)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


class FewSamplesWarning(UserWarning):
    """Fewer calibration samples than a Fisher method should be given (README: Safety)."""
