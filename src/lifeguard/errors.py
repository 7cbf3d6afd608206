"""Exceptions lifeguard raises to its users."""

from __future__ import annotations


class LifeguardError(Exception):
    """Base class of lifeguard's own errors."""


class ConfigurationError(LifeguardError, ValueError):
    """An option or a combination of settings lifeguard cannot work with.

    The message always says what to change.
    """
