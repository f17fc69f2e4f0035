"""The one base class of the errors featcache and maskfer show to users.

A :class:`FerError` is raised for bad input or state the user can fix (a missing file, a wrong field,
a store another build holds): its message names the file or field and the next step, and the CLIs
print it as one line and exit 1 instead of a traceback. Anything else reaching a CLI is a bug.

This module imports nothing of the project (maskfer imports it; featcache never imports maskfer).
Classes that keep a builtin base as well (``DeviceError(FerError, ValueError)``) do so because
callers catch them as that builtin.
"""
from __future__ import annotations

__all__ = ["FerError"]


class FerError(Exception):
    """An error whose message is meant for the user: it names the file/field and the next step."""
