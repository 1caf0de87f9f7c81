"""DeepSpeed's JIT-built ops (cpu_adam, the CPU shm comm op, ...): say when one is built,
and clear a build lock that a killed build left behind.

DeepSpeed compiles such an op with g++ the first time it is needed (a minute or two, in
silence) and caches it under ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``).
torch's build lock is a file that the building process creates and holds open; a build
killed half-way leaves the file, and every later run waits on it forever.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def _build_dir(name: str) -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)


def lock_holders(path: str) -> list[int] | None:
    """PIDs of the processes that hold ``path`` open, or None where that cannot be told (not Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target, pids = os.path.realpath(path), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


def clear_stale_lock(build_dir: str) -> bool:
    """Remove ``build_dir/lock`` if no process holds it open (a killed build's debris); True if removed."""
    lock = os.path.join(build_dir, "lock")
    if not os.path.exists(lock) or lock_holders(lock) != []:
        return False
    with contextlib.suppress(FileNotFoundError):  # another rank removed it first
        os.remove(lock)
    print(f"ds_chunk: removed a stale build lock left by an interrupted build: {lock}", file=sys.stderr, flush=True)
    return True


@contextlib.contextmanager
def announce_op_builds() -> Iterator[None]:
    """While DeepSpeed sets up, print a line before it compiles an op that is not cached yet,
    and clear a stale build lock first (``OpBuilder.jit_load`` is wrapped inside the block only)."""
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except ImportError:  # no deepspeed: nothing to build
        yield
        return
    original = OpBuilder.jit_load

    def jit_load(self, verbose=True):
        build_dir = _build_dir(self.name)
        clear_stale_lock(build_dir)
        if not os.path.exists(os.path.join(build_dir, f"{self.name}.so")):
            print(
                f"ds_chunk: DeepSpeed is compiling its {self.name} op, once (about 1-2 minutes on 2 cores; "
                f"cached in {build_dir})",
                file=sys.stderr,
                flush=True,
            )
        return original(self, verbose)

    OpBuilder.jit_load = jit_load
    try:
        yield
    finally:
        OpBuilder.jit_load = original


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"  # shm.cpp's SHM_BUFFER_NAME, then _<...>_<addr>_<port>_<rank>


def remove_shm_buffers(port: int | str, rank: int | None = None) -> int:
    """Unlink the shared-memory all-reduce buffers (64 MiB each, one per rank) that DeepSpeed's
    CPU comm op creates for the run on ``port`` and never unlinks: every CPU multi-rank run
    would otherwise leave them in /dev/shm until it is full. Call once every rank is done
    with them (the mappings stay valid; the memory goes with the last process). ``rank``:
    only that rank's buffer. Returns how many were removed."""
    if not os.path.isdir(SHM_DIR):
        return 0
    tail = f"_{port}_{rank}" if rank is not None else f"_{port}_"
    removed = 0
    for name in os.listdir(SHM_DIR):
        if name.startswith(SHM_PREFIX) and (name.endswith(tail) if rank is not None else tail in name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
    return removed


def leave_together() -> None:
    """Ranks leave the process group together: one that exits while ZeRO-3 still talks to it
    can abort the other at exit (exit code 250 after a finished run); then each rank's shm
    buffer is removed (``remove_shm_buffers``)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        rank = dist.get_rank()
        dist.destroy_process_group()
        if "MASTER_PORT" in os.environ:
            remove_shm_buffers(os.environ["MASTER_PORT"], rank)
