"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class FedxrError(Exception):
    """An error caused by the user's input (a file, a recipe, an argument) with the fix in its text."""

    exit_code = 1


class DataError(FedxrError):
    """A data file or data folder is missing, malformed or inconsistent."""
