"""``train_net.py --num-gpus N`` with or without GPUs.

With CUDA, Detectron2's own :func:`detectron2.engine.launch` runs unchanged (NCCL, one GPU
per process). Without it, N CPU processes train over gloo, as current Detectron2's
``launch`` does (v0.6's requires CUDA): same arguments (``--num-machines``,
``--machine-rank``, ``--dist-url``), same per-machine process groups in
``detectron2.utils.comm``. Each CPU process gets an equal share of the cores' intra-op
threads, so N processes do not oversubscribe them.

:func:`run_worker` is one such process, with either backend: what ``launch`` spawns without
CUDA, and what a cluster's scheduler starts once per GPU (``tools/run_with_submitit.py``: one
Slurm task per GPU, ranks from the job's environment).

The trainer's side of CPU DDP is :func:`ddp_without_device_ids`: Detectron2's
``create_ddp_model`` passes ``device_ids=[local rank]``, which DDP refuses for CPU modules.
"""

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["cpu_threads_per_process", "ddp_without_device_ids", "launch", "run_worker"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of
    ``num_machines`` machines (Detectron2's ``launch`` signature). Without CUDA, the
    processes are CPU workers over gloo; "GPUs" then counts workers."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                  machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
        return
    if not dist_url:
        raise ValueError("--dist-url is needed for more than one process (e.g. 'auto')")
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://host:port")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(
        run_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # the OS picks a free port
        return sock.getsockname()[1]


def cpu_threads_per_process(num_processes: int) -> int:
    """Intra-op threads for each of ``num_processes`` CPU workers on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // num_processes)


def run_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Worker ``machine_rank * num_per_machine + local_rank`` of ``world_size``: join the
    process group at ``dist_url`` (NCCL on GPU ``local_rank`` with CUDA; gloo and an equal
    share of the cores without), make this machine's local group, run ``main_func(*args)``."""
    if world_size == 1:
        main_func(*args)
        return
    if torch.cuda.is_available():
        backend = "nccl"
        # a cluster that gives each task one GPU shows it as device 0
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        backend = "gloo"
        torch.set_num_threads(cpu_threads_per_process(num_per_machine))
    rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(backend, init_method=dist_url, world_size=world_size, rank=rank,
                                timeout=timeout)
    except Exception as e:
        raise RuntimeError(f"worker {rank} could not join the process group at {dist_url}: "
                           f"{e}") from e
    _set_local_process_group(world_size, num_per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _set_local_process_group(world_size: int, num_per_machine: int, machine_rank: int) -> None:
    """``comm.get_local_rank()`` / ``get_local_size()``: the group of this machine's workers,
    made as Detectron2's launch makes it (every worker creates every machine's group)."""
    if hasattr(comm, "create_local_process_group"):  # Detectron2 > 0.6
        comm.create_local_process_group(num_per_machine)
        return
    for machine in range(world_size // num_per_machine):
        ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def ddp_without_device_ids() -> Iterator[None]:
    """While active, Detectron2's ``create_ddp_model`` (called by ``DefaultTrainer``) leaves
    ``device_ids`` out for a model on the CPU, where DDP refuses them; CUDA models are
    wrapped as Detectron2 wraps them."""
    create = defaults.create_ddp_model

    def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = create
