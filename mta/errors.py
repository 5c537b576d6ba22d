"""The one error type that means "the inputs are wrong", as opposed to a bug in the code.

A unit of work that fails with an InputError (a malformed user, a missing stage-2 match, a bank without
the anchor it needs) is recorded as that unit's failure and the run goes on; any other exception is a
programming error and stops the run with its traceback.
"""


class InputError(ValueError):
    """Bad or missing input data, named with its file, user and field."""
