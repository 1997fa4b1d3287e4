"""User-facing errors. The CLI prints these as one clear message (no traceback)."""


class CapbenchError(Exception):
    """Base class of errors caused by user input: bad files, fields, flags or environment."""


class DatasetError(CapbenchError):
    """A dataset file is missing, malformed, or names images that do not exist."""


class ConfigError(CapbenchError):
    """A config file or flag has an unknown key or an invalid value."""


class RecordError(CapbenchError):
    """A run record cannot be read or does not fit the requested operation."""


class ScoringError(CapbenchError):
    """Captions cannot be scored as given (e.g. the tokenizer's output does not match them one
    to one); nothing is scored rather than a wrong number."""


class StorageError(CapbenchError):
    """A folder capbench must write to is unwritable or too full (the message names it and
    says what to do)."""


class CapbenchWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it)."""


class BusyError(CapbenchError):
    """Another process is working on the same files (e.g. continuing the same unfinished
    run); nothing was changed."""
