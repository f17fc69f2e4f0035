"""maskfer: stage 2 of CAFE, the sigmoid-mask CNN trained against cached frozen features."""
from featcache.errors import FerError  # the base of every error meant for a user, featcache's and maskfer's

__all__ = ["FerError"]
