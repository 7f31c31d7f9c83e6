"""The mistakes a caller can make, as one small family of exceptions.

Everything raised as a `UserError` is a mistake of the caller (a bad value, path, file or data spec): the
CLI prints its message on one line and exits with code 2. Any other exception is a bug in anomalab: the CLI
says so on one line (the traceback with `-v`) and exits with code 1. Each class also derives from the
built-in exception Python code would expect (ValueError, FileNotFoundError, ...), so library callers can
catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the caller; the message says what is wrong and, where it can, how to fix it."""


class ParameterError(UserError, ValueError):
    """A detector, strategy, data-spec or command option has a wrong name, type or value."""


class UnknownNameError(UserError, KeyError):
    """An unknown detector, strategy or experiment name (str() is the plain message, not KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DataError(UserError, ValueError):
    """Images, masks or a data folder that cannot be used as given (unreadable, empty, wrong layout)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data file or folder that does not exist."""


class RunFolderError(UserError, FileExistsError):
    """An output path that may not be written: it exists (without --overwrite), is not a run folder, is one
    of the command's own inputs, or another process is writing it."""


class LoadError(UserError, RuntimeError):
    """A saved detector or model folder that cannot be loaded (missing, truncated, wrong version, bad JSON)."""


class NotFittedError(UserError, RuntimeError):
    """A detector used before `fit`."""


class StrategyError(UserError, ValueError):
    """A continual-learning strategy that cannot be applied to a detector (the message says why)."""


class NotSupportedError(UserError, NotImplementedError):
    """A request the chosen detector or model cannot serve (e.g. ONNX export of a detector without a fixed graph)."""


class ImageTypeError(UserError, TypeError):
    """Images passed as something other than a tensor or array (e.g. a list or a file name)."""
