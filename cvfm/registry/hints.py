"""Messages for ids that do not load: close matches, and why a hub model is out of reach."""

from __future__ import annotations

import difflib
import os

from cvfm.errors import CvfmError, UsageError


def suggest(name: str, choices) -> str:
    """The text ' (did you mean: a, b?)' for the choices close to `name`; "" when none is."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def offline_hint(model_id: str, e: Exception) -> CvfmError:
    """The error for a hub download that failed: not cached while HF_HUB_OFFLINE=1 (a usage error), or
    the first line of the cause."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return UsageError(
            f"'{model_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    return CvfmError(f"cannot load '{model_id}': {first_line(e)}")


def first_line(e: Exception) -> str:
    """The first line of an exception's message, or its type's name."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
