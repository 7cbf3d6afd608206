"""The installed version of lifeguard, importable from every layer."""

__version__ = "0.1.0"
