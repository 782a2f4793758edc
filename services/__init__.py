"""Baton services."""
