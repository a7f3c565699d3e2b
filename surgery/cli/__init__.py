"""The ``surgery`` command line."""

from surgery.cli.app import app, main

__all__ = ["app", "main"]
