"""The two kinds of failure a user sees: their input is wrong (exit 2) or the run failed (exit 1)."""


class CvfmError(RuntimeError):
    """A runtime failure: the request was valid but could not be carried out (exit code 1)."""

    exit_code = 1


class UsageError(CvfmError, ValueError):
    """The request itself is wrong: a bad id, path, column or option value (exit code 2)."""

    exit_code = 2
