"""User-facing errors. `train.py` prints each as one line (`fastmath: error: ...`) and exits with status 2.

Raise these for mistakes a user can fix (a typo, a missing file, unusable data); keep `assert` for
internal invariants, whose traceback is useful to us rather than to the user.
"""


class FastmathError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class ConfigError(FastmathError):
    """A config file, key, value or override is wrong."""


class DataError(FastmathError):
    """A dataset is missing, unreadable, or has no usable rows."""


class ModelError(FastmathError):
    """A model or tokenizer cannot be loaded or is unsuitable."""


class CheckpointError(FastmathError):
    """A checkpoint is missing, incomplete, corrupt, or belongs to a different run."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type name): the cause, without a library's traceback."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line, cut at a sentence end near `limit` characters.

    For libraries whose messages run over several lines, where the first line alone stops mid-sentence."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[:cut + 1] if cut > 0 else text[:limit] + "..."
