class UserError(Exception):
    """An error the user caused (bad flag, bad file, bad checkpoint).

    The CLI prints its message as one line and exits non-zero, without a traceback.
    """
