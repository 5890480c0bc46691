"""A multi-tenant Flask API whose patient records are encrypted per clinic."""

from .app import create_app

__all__ = ["create_app"]
