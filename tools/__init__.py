"""Offline tools that build what the server ships (not imported by the serving path)."""
