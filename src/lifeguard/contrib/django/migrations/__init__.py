"""Migrations of lifeguard.contrib.django."""
