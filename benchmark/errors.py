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


class ResourceError(CapbenchError):
    """A requested size does not fit this machine (memory, cores); the message gives the
    estimate, what is available and what to ask for instead."""


class TrainingDivergedError(CapbenchError):
    """The training loss became NaN or infinite (a learning rate too high, for example); the
    run stops without a record."""


class StorageError(CapbenchError):
    """A folder capbench must write to is unwritable or too full (the message names it and
    says what to do)."""


class CapbenchWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it)."""


class BusyError(CapbenchError):
    """Another process is working on the same files (e.g. continuing the same unfinished
    run); nothing was changed."""


def user_message(exc: BaseException) -> str:
    """The message of ``exc`` without the wrapping torch's DataLoader adds to an error raised
    in a worker process ("Caught DatasetError in DataLoader worker process 0. Original
    Traceback ..."): the worker's own message, its last line, as the main process would have
    said it. Other messages are returned unchanged."""
    text, cls = str(exc), type(exc)
    if not text.startswith(f"Caught {cls.__name__} ") or "\nOriginal Traceback" not in text:
        return text
    for marker in (f"\n{cls.__module__}.{cls.__qualname__}: ", f"\n{cls.__qualname__}: "):
        if (at := text.rfind(marker)) >= 0:
            return text[at + len(marker):].rstrip("\n")
    return text
