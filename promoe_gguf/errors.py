"""The one exception type users see for bad input."""


class ModelError(ValueError):
    """Bad or unsupported model input. The message names the file, tensor, expert or quant type."""


def one_line(text, limit: int = 300) -> str:
    """An error text as one line: its first non-empty line (torch's errors run to many), cut to `limit`."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[:limit] + "..."


class ParameterError(ModelError):
    """A setting out of its range or of the wrong kind. `param` is its Python name (the CLI shows its
    flag instead, the server its request field); the message is "<param> <detail>"."""

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param} {detail}")
        self.param, self.detail = param, detail


def clip(value, limit: int = 200) -> str:
    """repr(value) for a message, at most `limit` characters (a 3 MB field is not echoed back)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
