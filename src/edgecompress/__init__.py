"""edgecompress: make trained PyTorch models small and fast for edge devices.

    import edgecompress as ec
    result = ec.compress("digits-lenet300", ec.Recipe.from_yaml("recipes/prune-90.yaml"))
    print(result.report.to_markdown())
"""
from . import _torchvision
from .errors import ArtifactError, RecipeError
from .export.ecz import load
from .measure import Metrics, measure
from .pipeline import Result, compress
from .recipe import Recipe
from .report import Report
from .search import SearchResult, search  # the function shadows the subpackage's name on purpose
from .task import Task
from .version import __version__

_torchvision.install()  # a user's task factory may import PyPI's torchvision beside the CPU torch

__all__ = ["ArtifactError", "Metrics", "Recipe", "RecipeError", "Report", "Result", "SearchResult", "Task", "compress",
           "load", "measure", "search", "__version__"]
