"""No host-device synchronisation in the forward pass but the matcher's.

A synchronisation stalls the host until the GPU has run everything queued, so that the next
kernels are not queued while the GPU works. The code meant to be free of them is a training
step's forward (backbone, transformer, heads, denoising queries, set criterion) with the
Hungarian matcher excepted (it solves the assignment on the host), and the inference forward
before the post-processing (``forward_predictions``).

On CPU there is no device to wait for, so the check is what would synchronise on one:
:func:`no_host_sync` fails on reading a tensor on the host (``.item()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``bool``/``int``/``float`` of a tensor: ATen's
``_local_scalar_dense`` and Python's conversions) and on operators whose output shape depends
on the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``...). With CUDA,
``torch.cuda.set_sync_debug_mode("error")`` checks the same forward directly, host-to-device
copies included.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import List

import pytest
import torch
from detectron2.modeling import build_model
from test_amp import FAMILIES, FAMILY_IDS, batch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SMALL
from dab_detr.config import get_dab_detr_cfg

# Python-level reads of a tensor's values on the host
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
               torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
               torch.Tensor.__index__}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
             torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default}
_DATA_DEPENDENT = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)


class HostSyncError(AssertionError):
    pass


class _Guard(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.allowed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS and not self.allowed:
            raise HostSyncError(f"{func.__name__}() reads a tensor on the host")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.guard.allowed:
            if func in _INDEXING:
                # integer indices have a known size; a boolean mask's count is data
                if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                    raise HostSyncError(f"{func}: boolean-mask indexing (data-dependent size)")
            elif func is torch.ops.aten._local_scalar_dense.default:
                raise HostSyncError(f"{func}: a tensor read on the host")
            elif any(tag in func.tags for tag in _DATA_DEPENDENT):
                raise HostSyncError(f"{func}: output shape or value read from the data")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync() -> Iterator[_Guard]:
    """Raises :class:`HostSyncError` on what would synchronise a device with the host, except
    inside ``with allow(guard):``."""
    guard = _Guard()
    with guard, _DispatchGuard(guard):
        yield guard


@contextlib.contextmanager
def allow(guard: _Guard) -> Iterator[None]:
    guard.allowed += 1
    try:
        yield
    finally:
        guard.allowed -= 1


def _cfg(config_file: str, *opts: str):
    return get_dab_detr_cfg(config_file, ["MODEL.WEIGHTS", "", *SMALL, *opts])


@contextlib.contextmanager
def cuda_sync_allowed() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("error")


def _allow_matcher(model, allowed: Callable[[], contextlib.AbstractContextManager]) -> List:
    """Run the matcher's forward inside ``allowed()``; returns the list of its calls' logit
    shapes (one per matched output)."""
    matcher, calls = model.criterion.matcher, []
    forward = matcher.forward

    def matched(outputs, targets):
        with allowed():
            calls.append(outputs["pred_logits"].shape)
            return forward(outputs, targets)

    matcher.forward = matched
    return calls


def _allowed(guard: _Guard, func: Callable, *args):
    with allow(guard):
        return func(*args)


@pytest.mark.parametrize("call", [
    lambda x: x.sum().item(), lambda x: x.tolist(), lambda x: bool(x.any()),
    lambda x: float(x[0]), lambda x: x.cpu(), lambda x: x[x > 0], lambda x: x.nonzero(),
    lambda x: torch.unique(x), lambda x: x.masked_select(x > 0),
    lambda x: x.index_put_((x > 0,), torch.tensor(0.0)), lambda x: [1, 2, 3][x.long()[0]],
], ids=["item", "tolist", "bool", "float", "cpu", "mask_index", "nonzero", "unique",
        "masked_select", "mask_index_put", "index"])
def test_the_guard_catches_each_kind_of_sync(call):
    x = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(HostSyncError), no_host_sync():
        call(x)
    call(x)  # and only under the guard


def test_the_guard_lets_device_side_code_and_allowed_code_through():
    x = torch.tensor([0.5, -1.0, 2.0])
    with no_host_sync() as guard:
        y = torch.where(x > 0, x, 0) + x[torch.tensor([2, 0])].sum() + x.topk(2).values.sum()
        with allow(guard):
            value = y.sum().item()
    assert value == 17.5  # [0.5, 0, 2] + 2.5 + 2.5


@pytest.mark.parametrize("config_file", FAMILIES, ids=FAMILY_IDS)
def test_training_forward_syncs_only_in_the_matcher(config_file):
    model = build_model(_cfg(config_file)).train()
    data = batch()
    with no_host_sync() as guard:
        calls = _allow_matcher(model, lambda: allow(guard))
        # Detectron2's ImageList.from_tensors reads the images' sizes from tensors it makes on
        # the host: no device to wait for (the CUDA test below runs it unexcepted)
        preprocess = model.preprocess_image
        model.preprocess_image = lambda inputs: _allowed(guard, preprocess, inputs)
        losses = model(data)
    # every matched output went through the matcher: the final layer, the auxiliary ones and
    # the proposals of two-stage models
    matched = [k for k in losses if k.startswith("loss_giou") and "_dn" not in k]
    assert len(calls) == len(matched) >= 2
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("config_file", FAMILIES, ids=FAMILY_IDS)
def test_inference_forward_has_no_sync(config_file):
    model = build_model(_cfg(config_file)).eval()
    images = model.preprocess_image(batch())
    with torch.no_grad(), no_host_sync():
        outputs = model.forward_predictions(images, with_aux=False)
    assert outputs["pred_boxes"].shape[:2] == outputs["pred_logits"].shape[:2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config_file", FAMILIES, ids=FAMILY_IDS)
def test_cuda_forward_syncs_only_in_the_matcher(config_file):
    """The inputs on the GPU first (the loader's copy is the data path's, not the forward's);
    then a training forward (matcher excepted) and an inference forward, with CUDA's own
    detection of synchronising calls set to fail."""
    model = build_model(_cfg(config_file, "MODEL.DEVICE", "cuda")).train()
    data = batch("cuda")
    images = model.preprocess_image(data)
    torch.cuda.synchronize()
    calls = _allow_matcher(model, cuda_sync_allowed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = model(data)
        model.eval()
        with torch.no_grad():
            model.forward_predictions(images, with_aux=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls and all(torch.isfinite(v) for v in losses.values())
