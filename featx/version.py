"""featx's version, in a module of its own so that every other module can record it without importing the package."""

__version__ = "0.6.0"
