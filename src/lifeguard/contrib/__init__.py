"""Integrations that plug lifeguard into other frameworks' own machinery."""
