"""Errors that carry a message meant for the user (file, record, what was expected)."""


class UsageError(ValueError):
    """Bad input from the user: the CLI prints `gpt2mm <cmd>: error: ...` and exits with code 2."""


class DataError(ValueError):
    """A data file or record that does not fit its format; the message names the file and the record."""


class ModelNotFoundError(UsageError, OSError):
    """A model, tokenizer or backbone that is neither a local directory nor loadable from the hub (an
    OSError, as transformers raises for these, and a UsageError for the CLI)."""
