"""The one exception type users see: every message names the problem and the fix."""


class BrainSurgeonError(ValueError):
    """Bad input or an impossible request; the message says what to change."""


class FewSamplesWarning(UserWarning):
    """Fewer calibration samples than a Fisher method should be given (README: Safety)."""
