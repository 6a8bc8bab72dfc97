"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class SaisaError(Exception):
    """Bad input: the message names the file or flag and says what to do."""

    exit_code = 2
