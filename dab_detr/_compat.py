"""Compatibility shims applied before Detectron2 is imported.

Detectron2 v0.6 (the release on PyPI as ``pb1-detectron2``) predates Pillow 10 and may be
installed without its compiled extension ``detectron2._C``. Each shim here changes nothing
when the environment does not need it: an official Detectron2 built from source, with a
Pillow that still has ``Image.LINEAR``, is left untouched.
"""

import contextlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator

from PIL import Image

__all__ = ["HAS_D2_EXTENSION", "apply", "quiet_dependency_imports"]

HAS_D2_EXTENSION = True


def _patch_pillow() -> None:
    # detectron2/data/transforms/transform.py uses `Image.LINEAR` as a default argument;
    # Pillow 10 removed that alias of BILINEAR.
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


# Queries that Detectron2's environment report (`collect_env`, run by `default_setup`)
# makes of the extension; they describe the missing build instead of failing.
_BUILD_INFO = {
    "get_compiler_version": lambda: "not built (Python-only Detectron2)",
    "get_cuda_version": lambda: "not built (Python-only Detectron2)",
    "has_cuda": lambda: False,
}


class _MissingExtension(types.ModuleType):
    """Stand-in for ``detectron2._C`` whose every op raises a clear error when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _BUILD_INFO:
            return _BUILD_INFO[name]

        def missing_op(*args, **kwargs):
            raise RuntimeError(
                f"detectron2._C.{name} is not available: this Detectron2 was installed without "
                "its compiled C++/CUDA extension. DAB-DETR does not need it; to use the op, "
                "build Detectron2 from source (see README.md, 'Installing into an existing "
                "environment')."
            )

        return missing_op


def _install_extension_stand_in() -> None:
    global HAS_D2_EXTENSION
    if "detectron2._C" in sys.modules:
        HAS_D2_EXTENSION = not isinstance(sys.modules["detectron2._C"], _MissingExtension)
        return
    if importlib.util.find_spec("detectron2") is None:
        return  # Detectron2 is not installed; its own import error will say so.
    # find_spec on a submodule imports the (light) parent package, not the extension.
    if importlib.util.find_spec("detectron2._C") is not None:
        return
    HAS_D2_EXTENSION = False
    sys.modules["detectron2._C"] = _MissingExtension("detectron2._C")


def apply() -> None:
    """Apply every shim; safe to call more than once."""
    _patch_pillow()
    _install_extension_stand_in()


@contextlib.contextmanager
def quiet_dependency_imports() -> Iterator[None]:
    """Hide, while Detectron2 and fvcore are first imported, the warnings they cause and a
    user cannot act on: torch >= 2.10 deprecates ``torch.jit.script``, which fvcore's focal
    loss and Detectron2's box regression call at import time. The filter is narrow (this
    message, raised by torch's ``torch.jit._script``) and lasts for the imports only: a
    user's own ``torch.jit.script`` still warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
            module=r"torch\.jit\._script",
        )
        yield
