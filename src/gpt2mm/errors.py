"""Errors that carry a message meant for the user (file, record, what was expected)."""


class UsageError(ValueError):
    """Bad input from the user: the CLI prints `gpt2mm <cmd>: error: ...` and exits with code 2."""


class DataError(ValueError):
    """A data file or record that does not fit its format; the message names the file and the record."""


class DamagedFileError(DataError):
    """A saved file (a checkpoint's, a model's) that fails its manifest's size or checksum, or cannot be
    parsed: the message names the file and what is wrong. The CLI prints it as one line (code 2)."""


class WriteError(OSError):
    """An output that could not be written (no space, no permission, a folder gone): the message names the
    path, what was being written and the free space there (see `gpt2mm.outputs.writing`). The CLI prints it
    as one line, without a traceback, and exits with code 2. `errno` is the underlying error's."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class ModelNotFoundError(UsageError, OSError):
    """A model, tokenizer or backbone that is neither a local directory nor loadable from the hub (an
    OSError, as transformers raises for these, and a UsageError for the CLI)."""


def add_hint(error: Exception, hint: str) -> Exception:
    """`error` with `; hint` appended to its message (what to do next, e.g. how to resume); returns it."""
    if hint and error.args:
        error.args = (f"{error.args[0]}; {hint}", *error.args[1:])
    return error
