"""Errors of `porter verify` that are the user's input, not a parity failure (exit code 2)."""


class VerifyInputError(Exception):
    """Bad target, config, model file or option."""
