"""Errors of maskfer's training path, kept in one low module so every layer can raise them.

FerError (featcache.errors), re-exported here, is the base of every error meant for a user, featcache's too.
"""
from __future__ import annotations

from featcache.errors import FerError

__all__ = ["FerError", "TrainError"]


class TrainError(FerError):
    """Training cannot start or go on; the message names the file or option and the next step."""
