"""User-facing errors: the CLI prints them on one line and exits with code 2."""


class OutlierqError(Exception):
    """Bad input or an unsupported request. The message names the problem and the fix."""
