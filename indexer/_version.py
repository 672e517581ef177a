"""The package version, in one place below everything (the HTTP API reports it)."""

__version__ = "0.1.0"
