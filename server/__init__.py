"""Corral's application core: settings, database, models, domain services, app and CLI."""

__version__ = "0.1.0"
