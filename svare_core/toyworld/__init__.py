"""Procedural toy world (shapes/colours/styles) and an analytic oracle that reads it back."""
from . import world  # noqa: F401
