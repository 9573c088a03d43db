"""The one exception type users see: a message that says what was wrong and what to do."""


class CropflowError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints the message (no traceback) and exits with status 2.
    """
