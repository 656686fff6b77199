"""
Distributed setup for ``mpiexec``, ``torchrun`` and single-process runs.

Under ``mpiexec -n N`` ranks come from MPI (mpi4py is imported only then); under ``torchrun``
from its environment variables; otherwise the run is one process and no process group is
created. NCCL is used on CUDA and gloo on CPU; each process uses the GPU of its local rank.

``teardown_dist()`` destroys the process group again; ``run_script`` calls it on every exit of a
script and ``setup_dist`` registers it with ``atexit`` for everything else. Without it a gloo
worker thread may still drop the last reference to a tensor that Python created (the buffers of
the last all-reduce) after the interpreter has begun to shut down: taking the GIL then ends the
thread inside a destructor, and the process dies with ``terminate called without an active
exception`` (signal 6) although the run finished.
"""
from __future__ import annotations

import atexit
import gc
import io
import os
import socket
import sys
import warnings
from typing import Any, Iterable, Mapping, Optional

import blobfile as bf
import torch
import torch.distributed as dist

if dist.is_available():
    # Imported before any process group exists, on purpose: its functions take ``group=group.WORLD``
    # as a default argument, evaluated at import. Imported later (torch._dynamo imports it, and DDP
    # imports torch._dynamo), those defaults would hold the process group for the life of the
    # interpreter, so destroying the group could never free its backend and stop its threads.
    import torch.distributed.nn  # noqa: F401

# Upstream's cluster layout: the GPU of rank r was r % GPUS_PER_NODE (it rewrote
# CUDA_VISIBLE_DEVICES). Here a process uses the GPU of its local rank on its node (from MPI's
# shared-memory communicator or torchrun's LOCAL_RANK), which is the same GPU when every node runs
# GPUS_PER_NODE ranks, and needs no constant; kept, at upstream's value, for code that reads it.
GPUS_PER_NODE = 8

# Upstream defines this and never reads it (its setup does not retry); kept at its value.
SETUP_RETRY_COUNT = 3

# Environment variables that MPI launchers set (Open MPI, MPICH/Hydra, PMIx).
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_state = {"device": None, "launcher": None, "local_rank": 0, "atexit": False}


def launcher() -> str:
    """Which launcher started this process: ``"mpi"``, ``"torchrun"`` or ``"single"``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return "torchrun"
    if any(v in os.environ for v in _MPI_SIZE_VARS):
        return "mpi"
    return "single"


def launched_world_size() -> int:
    """
    The number of processes the launcher started, read from its environment (no process group
    is set up): for checks that must run before anything is initialised (``--print_config``).
    """
    if launcher() == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    for var in _MPI_SIZE_VARS[:3]:  # MPI_LOCALNRANKS counts one node only
        if var in os.environ:
            return int(os.environ[var])
    return 1


def launched_rank() -> int:
    """
    This process's rank as the launcher set it in the environment (0 for one process): for what
    must know the rank whether or not a process group was set up (e.g. which rank reports an error).
    """
    if is_distributed():
        return get_rank()
    if launcher() == "torchrun":
        return int(os.environ["RANK"])
    for var in _MPI_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def setup_dist(backend: Optional[str] = None) -> None:
    """
    Set up the process group (if several processes) and pick this process's device.

    Idempotent. Multi-node runs work through the MPI host file (rank 0's address is broadcast)
    or torchrun's rendezvous.

    :param backend: "nccl" or "gloo"; by default NCCL when CUDA is available, else gloo.
    """
    if _state["device"] is not None:
        return
    kind = launcher()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = 0
    if kind == "mpi":
        from mpi4py import MPI  # only under mpiexec

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank = node.Get_rank()
        node.Free()  # only needed for the local rank; a communicator left allocated is not a clean finalize
        if world > 1:
            addr = socket.gethostbyname(socket.getfqdn()) if rank == 0 else None
            port = _free_port() if rank == 0 else None
            addr, port = comm.bcast((addr, port), root=0)
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(port))
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
            os.environ["LOCAL_RANK"] = str(local_rank)
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    elif kind == "torchrun":
        local_rank = int(os.environ["LOCAL_RANK"])
        if int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://")
    if is_distributed() and not _state["atexit"]:
        # the safety net for code that does not end through run_script (atexit runs before the
        # interpreter starts to shut down, so the backend's threads can still take the GIL)
        atexit.register(_teardown_at_exit)
        _state["atexit"] = True
    _state["launcher"], _state["local_rank"] = kind, local_rank
    if torch.cuda.is_available():
        # The GPU of this process is its local rank (no rewriting of CUDA_VISIBLE_DEVICES).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _state["device"] = device
    if get_rank() > 0:
        quiet_repeated_warnings()


def teardown_dist() -> None:
    """
    Destroy the process group (a no-op in one process or when there is none; idempotent) and
    forget this process's device, so that ``setup_dist`` would start afresh.

    After ``destroy_process_group`` the backend may still be held by a DDP wrapper inside a
    reference cycle (a ``TrainLoop``); collecting those cycles now frees it, and the gloo
    backend's destructor waits for its queued work and joins its worker threads while the
    interpreter is fully alive. MPI itself is finalised by mpi4py when the interpreter exits.
    Call it on every rank at the end, whatever ended the script (``run_script`` does).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
    _state.update(device=None, launcher=None, local_rank=0)


def _teardown_at_exit() -> None:
    # An exception that ended the script is kept in sys.last_* (for post-mortem debugging, which
    # an exiting interpreter no longer offers); its frames would keep the DDP wrapper and with it
    # the backend alive past this point.
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
    teardown_dist()


def quiet_repeated_warnings() -> None:
    """
    On ranks other than 0: ignore FutureWarnings (deprecation notices such as DDP's
    ``broadcast_buffers`` one), which every rank would print alike; rank 0 still prints each once.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)


def dev() -> torch.device:
    """The device this process computes on (sets up a single process when not done yet)."""
    if _state["device"] is None:
        setup_dist()
    return _state["device"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return _state["local_rank"]


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_from_rank0(value: Any) -> Any:
    """
    Rank 0's ``value`` on every rank (any picklable object; itself in one process): for the decisions
    every rank must take alike (a folder name with a timestamp, whether a file exists), so that all
    ranks raise or none does, and none waits alone.
    """
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (a no-op in one process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


def load_state_dict(path: str, **kwargs):
    """
    Load a checkpoint (local path or any blobfile URL) into CPU memory.

    Safe by default: ``weights_only=True`` (tensors and plain Python values only), so a file from
    someone else cannot run code; pass ``weights_only=False`` only for files you trust. A file the
    safe load cannot read (not a torch file, or a pickle of other objects) is a ``ValueError`` naming
    it (``safe_torch_load``), without torch's advice to retry unsafely.

    :param kwargs: passed to ``torch.load`` (``map_location`` defaults to "cpu").
    """
    kwargs.setdefault("map_location", "cpu")
    kwargs.setdefault("weights_only", True)
    if not bf.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with bf.BlobFile(path, "rb") as f:
        data = f.read()
    if not kwargs["weights_only"]:
        return torch.load(io.BytesIO(data), **kwargs)
    return safe_torch_load(io.BytesIO(data), path, **kwargs)


# torch's own text around a refused weights_only load: advice to retry with weights_only=False or to
# allowlist the refused global (both run the file's code), and pointers to its docs; lines that hold
# one of these are dropped from our messages
_TORCH_ADVICE = ("weights_only", "weights only", "trusted source", "safe_globals", "allowlist",
                 "check the documentation", "please file an issue")


def _torch_detail(error: BaseException) -> str:
    """What torch said went wrong, without its advice (see ``_TORCH_ADVICE``)."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not any(a in line.lower() for a in _TORCH_ADVICE)]
    return " ".join(kept)


def load_error_message(path: Any, error: BaseException, head: bytes = b"", what: str = "checkpoint") -> str:
    """
    The message for a file a safe ``torch.load`` (``weights_only=True``) could not read: it names
    the file, says whether it is no torch file at all, or holds objects that loading could run code
    for, and never repeats torch's advice to retry with ``weights_only=False``.

    :param head: the file's first bytes, when known (a torch file starts as a zip or a pickle).
    :param what: what the file was expected to be, for the message ("checkpoint", "state file").
    """
    import pickle

    detail = _torch_detail(error)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        kind = "an empty file" if not head else f"it starts with {head[:16]!r}"
        return (f"{path} is not a valid {what}: not a file written by torch.save ({kind}); "
                f"pass a {what} written by this project or upstream's code")
    if isinstance(error, pickle.UnpicklingError) and "global" in detail.lower():
        return (f"refused to load the {what} {path}: it is not a valid {what} of tensors and plain Python "
                f"values; it holds other Python objects, and loading it could run code ({detail}). Use a {what} "
                "written by this project or upstream's code")
    why = f"{type(error).__name__}" + (f": {detail}" if detail else "")
    return f"{path} is not a valid {what}: it cannot be read as a torch file ({why})"


def safe_torch_load(source: Any, path: Any = None, what: str = "checkpoint", **kwargs):
    """
    ``torch.load(source, weights_only=True, **kwargs)``; any failure becomes a ``ValueError`` whose
    message (``load_error_message``) names the file and what was wrong, without torch's advice to
    load it unsafely; an ``OSError`` (a missing or unreadable file) is raised as it is.

    :param source: a path or a binary file object.
    :param path: the file's name for messages (default ``source``).
    """
    kwargs["weights_only"] = True
    path = source if path is None else path
    try:
        return torch.load(source, **kwargs)
    except OSError:  # a missing or unreadable file: the OS's own error (it names the file)
        raise
    except Exception as e:  # noqa: BLE001 - every failure to read is reported with the file
        try:
            if hasattr(source, "seek"):
                source.seek(0)
                head = source.read(16)
            else:
                with open(source, "rb") as f:
                    head = f.read(16)
        except Exception:  # noqa: BLE001 - the head only refines the message
            head = b"\x80"
        error = ValueError(load_error_message(path, e, head, what))
    raise error  # outside the except clause: torch's error (and its advice) is not chained to ours


def state_dict_mismatch(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], show: int = 8) -> str:
    """
    Describe how a checkpoint's ``state`` differs from a model's ``expected`` state_dict.

    :param show: how many keys of each kind to name.
    :return: "" when the keys and shapes match, else e.g. "2 shape mismatches: a: checkpoint (3,) vs
             model (4,), ...; 1 key(s) missing from the checkpoint: b".
    """
    def first(items: list) -> str:
        return ", ".join(items[:show]) + (f" ... (+{len(items) - show} more)" if len(items) > show else "")

    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {first(shapes)}")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint: {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {first(unexpected)}")
    return "; ".join(parts)


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Broadcast parameters (and buffers) from rank 0 so every rank starts identical."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)
