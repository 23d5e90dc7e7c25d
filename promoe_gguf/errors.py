"""The one exception type users see for bad input."""


class ModelError(ValueError):
    """Bad or unsupported model input. The message names the file, tensor, expert or quant type."""
