"""User-facing errors: the CLI prints them as one line, without a traceback."""


class BSFError(Exception):
    """An error caused by the user's input (config, paths, data), not by a bug."""


class ConfigError(BSFError):
    """A configuration key or value is unknown, mistyped or out of range."""


class DataError(BSFError):
    """A data file or folder is missing, unreadable or inconsistent; the message names it."""


class CheckpointError(BSFError):
    """A checkpoint cannot be read or does not match the model; the message lists every unmatched key."""


class OutputError(BSFError):
    """An output path cannot be written safely (a folder, one of the inputs, an existing file, no permission)."""
