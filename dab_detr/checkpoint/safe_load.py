"""Loading weight files without running code from them.

``.pth``/``.bin`` files go through ``torch.load(weights_only=True)`` (which may also rebuild
the ``argparse.Namespace`` that training scripts save beside the weights), ``.safetensors``
through safetensors, and Detectron2's ``.pkl`` model-zoo files through an unpickler that
only rebuilds numpy arrays and plain containers. A file that needs anything else is refused
with an error naming it.
"""

import argparse
import contextlib
import importlib
import io
import os
import pickle
import zipfile
from typing import Any, ContextManager, Dict

import numpy as np
import torch

from ..utils.user_errors import InputFileNotFoundError, InputValueError

__all__ = [
    "UnsafeCheckpointError",
    "load_restricted_pickle",
    "load_state_dict_file",
    "resolve_weight_file",
]


class UnsafeCheckpointError(InputValueError):
    """The file would need arbitrary unpickling (code execution) to load."""


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 uses it in pickles of protocol 0-2, which have no bytes
    type: a ``bytes`` (e.g. a numpy array's data) is stored as ``encode(text, "latin1")``.
    Nothing else is let through, so no codec of the registry can be reached."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): pickles only "
            "use it to store bytes as latin-1 text"
        )
    return text.encode("latin1")


# numpy 2 renamed numpy.core to numpy._core; files name whichever numpy wrote them. Both
# resolve to the installed numpy's own module (numpy 2 warns on numpy.core.numeric).
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
_NUMPY_FUNCTIONS = {
    # ndarray.__reduce_ex__: protocols 0-4, and 5 for arrays neither C- nor F-contiguous
    "multiarray": ("_reconstruct", "scalar"),
    # protocol 5, contiguous arrays: the data in-band, rebuilt by np.frombuffer + reshape
    "numeric": ("_frombuffer",),
}
# (module, name) a numpy/containers pickle may reference -> the (module, name) to load
_PICKLE_ALLOWED = {
    (f"{core}.{mod}", name): (f"{_NUMPY_CORE}.{mod}", name)
    for core in ("numpy.core", "numpy._core")
    for mod, names in _NUMPY_FUNCTIONS.items()
    for name in names
}
_PICKLE_ALLOWED.update({
    (mod, name): (mod, name)
    for mod, name in [("numpy", "ndarray"), ("numpy", "dtype"),
                      ("collections", "OrderedDict"), ("builtins", "dict"),
                      ("builtins", "list"), ("builtins", "tuple"), ("builtins", "bytes")]
})
# protocol 0-2 pickles written by Python 3 spell builtins "__builtin__" (for Python 2); an
# empty bytes is ``__builtin__.bytes()``
_PICKLE_ALLOWED[("__builtin__", "bytes")] = ("builtins", "bytes")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {module}.{name}: only numpy arrays and plain "
                "containers are allowed in weight files"
            )
        module, name = _PICKLE_ALLOWED[module, name]
        return getattr(importlib.import_module(module), name)


def load_restricted_pickle(path: str) -> Any:
    """Unpickle ``path`` (any protocol, 0 to 5) allowing numpy arrays and plain containers
    only."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:
        # e.g. protocol 5 data written out-of-band: it is not in the file
        raise InputValueError(f"{path}: not a readable weight pickle ({e})") from None


def resolve_weight_file(path: str) -> str:
    """``path`` itself, or for a transformers model directory its weight file."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise InputFileNotFoundError(f"no such checkpoint: {path}")
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise InputFileNotFoundError(
        f"{path} has neither model.safetensors nor pytorch_model.bin"
    )


def _check_torch_file(path: str) -> None:
    """Refuse, naming the file, what is neither of torch's formats: a zip archive (torch >=
    1.6) or a legacy pickle (protocol 2, whose first byte is 0x80)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise InputValueError(
            f"{path} is not a weight file: neither a torch checkpoint (.pth/.bin), a "
            "safetensors file nor a Detectron2 .pkl"
        )


def _torch_safe_globals() -> ContextManager:
    """Classes ``torch.load(weights_only=True)`` may rebuild besides tensors and containers.

    The official training script (DETR's, and so DAB-DETR's ``main.py``) saves its
    ``argparse.Namespace`` beside the weights (``{"model", "optimizer", "lr_scheduler",
    "epoch", "args"}``): a plain attribute holder, harmless to rebuild. torch < 2.5 has no
    per-call allow-list, and refuses such files.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def load_state_dict_file(path: str) -> Dict[str, Any]:
    """Read a weight file (or transformers model directory) into a dict of tensors.

    Returns the top-level dict of a ``.pth``/``.bin`` file as loaded (``{"model": ...}``
    wrappers and other entries are kept), the tensors of a ``.safetensors`` file, and the
    ``"model"`` dict of a ``.pkl`` file (the whole dict if it has none) with its numpy arrays
    turned into tensors.
    """
    path = resolve_weight_file(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as e:
            raise InputValueError(f"{path}: not a readable safetensors file ({e})") from None
    if path.endswith(".pkl"):
        data = load_restricted_pickle(path)
        model = data.get("model", data) if isinstance(data, dict) else data
        if not isinstance(model, dict):
            raise InputValueError(
                f"{path}: expected a dict of arrays, got {type(model).__name__}"
            )
        return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in model.items()}
    _check_torch_file(path)
    try:
        with _torch_safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs objects other than tensors and plain containers "
            f"(torch weights-only loader: {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # a truncated or corrupt file
        raise InputValueError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
