"""The process launcher that transformers' parallelism mixins import, written by moe-mtp.

`test_tensor_parallel_mixin.py`, `test_expert_parallel_mixin.py` and `test_fsdp_mixin.py` (from transformers' sdist)
import `run_distributed` and a few device helpers from `.distributed_testing_utils`, which the sdist does not ship.
prepare.py copies this file into the extracted `transformers_tests` package under that name.

Ranks are started from a fork server that has already imported torch, transformers and the packages of the function
it runs, so each rank starts in well under a second instead of re-importing everything (several CPU-seconds per
process), and none of them inherits the pytest process' threads, as plain `fork` would. Every rank runs one thread:
the ranks of a test share the machine's cores. On CPU they talk through gloo; on an accelerator, through the
device's default backend, one device per rank.
"""

from __future__ import annotations

import datetime
import functools
import gc
import multiprocessing
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers.testing_utils import torch_device

# A rank that waits on a peer which died raises after this long instead of hanging the suite.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("MOE_MTP_DISTRIBUTED_TIMEOUT", "300")))
ACCELERATORS = ("cuda", "xpu", "npu", "hpu")


def _get_distributed_device_type() -> str:
    """The device type the ranks run on: the test device when it is an accelerator, otherwise the CPU."""
    return torch_device if torch_device in ACCELERATORS else "cpu"


def _get_distributed_backend() -> str:
    """The process-group backend for that device type: gloo on CPU, e.g. nccl on CUDA."""
    return dist.get_default_backend_for_device(_get_distributed_device_type())


def _get_rank_device(rank: int) -> torch.device:
    device_type = _get_distributed_device_type()
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, rank % getattr(torch, device_type).device_count())


def _set_rank_device(rank: int) -> None:
    """Makes the rank's device current (a no-op on CPU); some backends need it before the process group exists."""
    device = _get_rank_device(rank)
    if device.type != "cpu":
        getattr(torch, device.type).set_device(device)


def _preload(fn, args) -> list[str]:
    """Modules the fork server imports once: torch, transformers and the packages that define `fn` and its
    callable or class arguments (the mixin module, the model classes)."""
    modules = {"torch", "torch.distributed", "transformers", "transformers.testing_utils"}
    for obj in (fn, *args):
        module = getattr(obj, "__module__", None) if callable(obj) else None
        if module and module != "__main__":
            modules.update({module.split(".")[0], module})
    return sorted(modules)


def _start_rank_processes(fn, args=(), nprocs: int = 2) -> None:
    """Runs `fn(rank, *args)` in `nprocs` processes and waits for all of them. A rank that raises makes this raise
    (with its traceback) once the others have been stopped."""
    # The fork server's environment is the one it starts with, so set the thread count first.
    os.environ["OMP_NUM_THREADS"] = "1"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_preload(fn, args))  # read when the server starts: the first call in a session
    mp.start_processes(_one_thread, args=(fn, args), nprocs=nprocs, join=True, start_method="forkserver")


def _one_thread(rank, fn, args):
    torch.set_num_threads(1)
    fn(rank, *args)


def _rank_main(rank, func, world_size, store_host, store_port, args, kwargs):
    """One rank of `run_distributed`: joins the group through the launcher's store, runs `func(rank, ...)`."""
    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=store_host, MASTER_PORT=str(store_port),
    )  # fmt: skip
    _set_rank_device(rank)
    store = dist.TCPStore(store_host, store_port, world_size=None, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        _get_distributed_backend(), store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        func(rank, *args, **kwargs)
        # Freed objects and both ranks done first: see tests/test_distributed.py's `rank_of_two`.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int = 2):
    """`run_distributed(world_size=2)(func)(*args, **kwargs)` runs `func(rank, *args, **kwargs)` on `world_size`
    ranks inside one initialized process group and fails if any rank fails. `func` and its arguments must pickle
    (module-level functions, classes, plain data)."""

    def decorator(func):
        @functools.wraps(func)
        def launch(*args, **kwargs):
            # The store lives in this process while the ranks start, so its (free) port cannot be taken meanwhile.
            store = dist.TCPStore("localhost", 0, world_size=None, is_master=True, wait_for_workers=False)
            try:
                _start_rank_processes(
                    _rank_main, args=(func, world_size, store.host, store.port, args, kwargs), nprocs=world_size
                )
            finally:
                del store

        return launch

    return decorator
