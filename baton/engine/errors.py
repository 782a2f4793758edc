"""Errors that cross process boundaries, importable without torch (the router never loads a model)."""

from __future__ import annotations


class PayloadError(ValueError):
    """A KV payload that is malformed or does not belong to this model."""
