"""Errors that are the user's to fix (bad flags, config keys or files): reported in one line."""


class UsageError(ValueError):
    pass
