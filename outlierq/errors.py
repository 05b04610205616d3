"""User-facing errors: the CLI prints them on one line and exits with code 2."""


class OutlierqError(Exception):
    """Bad input or an unsupported request. The message names the problem and the fix."""


class OutlierqNotice(UserWarning):
    """Something a family's layout does not allow was skipped (the message says what and why)."""
