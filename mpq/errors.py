"""The one exception type that means "the user gave us something wrong".

Scripts catch it, print its message on one line and exit with code 2, so every bad-input path
looks the same to a user and to a test. Anything else is a bug and keeps its traceback.
"""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input: a wrong path, recipe value, checkpoint or flag. The message says how to fix it."""
