"""The two exception types a user of edgecompress sees.

Every message is one line naming the field or path, the rule and the value, e.g.
``recipe.yaml: stages[2].bits must be one of 2, 4, 8; got 3``. The CLI prints it and exits 2.
"""
from __future__ import annotations


class RecipeError(ValueError):
    """Bad user input: a recipe, a task name, an option, a layer pattern, a missing path."""


class ArtifactError(ValueError):
    """A model file that cannot be read: wrong format, truncated, hostile or corrupt."""
