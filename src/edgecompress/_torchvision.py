"""``import torchvision`` beside the CPU torch edgecompress pins, for users' task factories too.

PyPI's torchvision wheel is built against a CUDA torch: beside the CPU torch its C++ extension does not
load, and the import then fails registering fake kernels for operators the extension would have defined
(``RuntimeError: operator torchvision::nms does not exist``). ``install()``, run by ``import
edgecompress``, puts a finder on ``sys.meta_path`` that acts only when torchvision is imported: if that
import fails so, the missing schemas are defined (no kernels: torchvision's models never call them) and
the import runs again; if that fails too, one ImportError says what to install. Nothing is imported
before then.
"""
from __future__ import annotations

import importlib.machinery
import sys

SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # the torch.library.Library that holds the schemas, kept for the life of the process


def define_ops() -> None:
    global _library
    if _library is None:
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        for schema in SCHEMAS:
            lib.define(schema)
        _library = lib


class _Loader:
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        error = self._run(module)
        if error is not None and _library is None:
            define_ops()
            for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                del sys.modules[name]
            error = self._run(module)
        if error is not None:
            import torch

            raise ImportError(f"torchvision cannot load beside torch {torch.__version__} ({error}); install the "
                              f"CPU torchvision build made for this torch (from PyTorch's CPU wheel index)")

    def _run(self, module) -> str | None:
        """Run torchvision's ``__init__``: None, or the first line of a missing-operator error."""
        try:
            self.loader.exec_module(module)
        except RuntimeError as e:
            if "torchvision::" not in str(e):
                raise
            return str(e).splitlines()[0]
        return None


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; not when torchvision is imported already)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
