"""Errors a user can act on. Each message names the field and the fix; the CLI and the server
turn them into a one-line message or an HTTP 4xx instead of a traceback."""


class HeronError(Exception):
    """Base class for errors caused by input or environment, not by a bug in heron."""


class InvalidRequestError(HeronError, ValueError):
    """A request or a setting has a bad value (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(HeronError):
    """A model could not be found, read, or is of an architecture heron does not support."""
