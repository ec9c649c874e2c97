"""One exception type for bad input: its message names the problem and the fix."""


class EmlocError(ValueError):
    """Raised for input emloc-nb cannot use. The message says what to do instead."""
