"""The version of edgecompress: one source, read by pyproject.toml, the package root, the .ecz header's
producer and a search's recorded settings."""

__version__ = "0.1.0"
