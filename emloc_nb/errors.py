"""One exception type for bad input: its message names the problem and the fix."""


class EmlocError(ValueError):
    """Raised for input emloc-nb cannot use. The message says what to do instead."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception as one short line (its type and the first line of its message), to quote in an EmlocError."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit]}" if text else type(error).__name__
