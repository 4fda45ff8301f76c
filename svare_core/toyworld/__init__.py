"""Procedural toy world (shapes/colours/styles) and an analytic oracle that reads it back."""
from . import oracle, world  # noqa: F401
from .oracle import Oracle  # noqa: F401
