"""Operational instruments: readings that tell a working run from reward hacking."""
