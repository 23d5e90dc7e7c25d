"""The one exception type users see for bad input."""


class ModelError(ValueError):
    """Bad or unsupported model input. The message names the file, tensor, expert or quant type."""


def one_line(text, limit: int = 300) -> str:
    """An error text as one line: its first non-empty line (torch's errors run to many), cut to `limit`."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[:limit] + "..."
