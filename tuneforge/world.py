"""Ranks as processes: ``World`` (one rank's view of the job) and ``spawn`` (start N ranks here).

Every setting runs one process per rank; only the transport under the heap changes:

- N GPUs (``torchrun`` -> ``World.from_env()``, or ``spawn(..., device="cuda")`` with enough GPUs):
  rank r uses ``cuda:r``, the default process group is NCCL.
- N processes sharing one GPU (``spawn(..., device="cuda")`` with fewer GPUs than ranks, or
  ``share_gpu=True``): every rank uses ``cuda:0``; the default group is gloo (NCCL refuses two
  ranks on one device).
- CPU (``spawn(..., device="cpu")``, CI): Triton's interpreter, gloo.

Every world also has a gloo group (``world.cpu_group``) for host-side exchange (IPC handles,
barriers, gathering references), whatever the default group's backend.

``spawn(fn, n, *args)`` runs ``fn(world, *args)`` on every rank and returns the results by rank;
a rank's exception is re-raised in the caller with the rank named; at the deadline every rank is
killed and ``TimeoutError`` names the ranks that had not finished: a world never hangs its caller.
``fn`` must be importable (a module-level function) and return picklable values (CPU tensors,
numbers, strings).
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class World:
    """One rank's view: ``rank``, ``size``, ``device`` and the process groups."""

    rank: int
    size: int
    device: torch.device
    group: Any = None            # the default process group (NCCL on distinct GPUs, else gloo)
    cpu_group: Any = None        # gloo, for host-side objects and barriers
    shared_gpu: bool = False     # True when several ranks share one GPU
    owns_process_group: bool = False
    _closed: bool = field(default=False, repr=False)

    # --- construction -------------------------------------------------------------------------

    @staticmethod
    def from_env(device: Optional[str] = None, timeout: float = 600.0) -> "World":
        """The world ``torchrun`` (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR/PORT)
        started: one process per GPU, rank r on ``cuda:LOCAL_RANK`` (``device="cpu"`` forces CPU)."""
        missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
        if missing:
            from tuneforge.errors import InputError
            raise InputError(f"World.from_env needs {', '.join(missing)} in the environment (run under torchrun)")
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = device != "cpu" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        shared = use_cuda and torch.cuda.device_count() < local_world
        dev = torch.device("cuda", 0 if shared else local_rank) if use_cuda else torch.device("cpu")
        return World._init(rank, size, dev, "env://", shared, timeout)

    @staticmethod
    def _init(rank: int, size: int, device: torch.device, init_method: str, shared_gpu: bool,
              timeout: float) -> "World":
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" and not shared_gpu else "gloo"
        owns = not dist.is_initialized()
        td = datetime.timedelta(seconds=timeout)
        if owns:
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                    timeout=td, **kwargs)
        group = dist.group.WORLD
        cpu_group = group if dist.get_backend(group) == "gloo" else dist.new_group(backend="gloo", timeout=td)
        return World(rank, size, device, group, cpu_group, shared_gpu, owns)

    # --- host-side collectives ----------------------------------------------------------------

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group)

    def barrier(self) -> None:
        """Host barrier over the gloo group (no device work is waited for)."""
        dist.barrier(group=self.cpu_group)

    def synchronize(self) -> None:
        """Wait for this rank's device work, then for every rank to get here."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.barrier()

    def all_gather_object(self, obj: Any) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, on the CPU (first dims may differ between ranks). For references and
        checks, not for speed: it goes through gloo on host copies."""
        t = t.detach().contiguous().cpu()
        shapes = self.all_gather_object(tuple(t.shape))
        rows = max(s[0] if s else 1 for s in shapes)
        padded = torch.zeros((rows, *t.shape[1:]) if t.dim() else (1,), dtype=t.dtype)
        padded[: t.shape[0] if t.dim() else 1] = t if t.dim() else t.reshape(1)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        # gloo lacks some low-precision reductions but gathers are plain copies: move bytes.
        dist.all_gather([p.view(torch.uint8) for p in parts], padded.view(torch.uint8), group=self.cpu_group)
        return [p[: s[0]] if s else p.reshape(()) for p, s in zip(parts, shapes)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


# --- spawn ----------------------------------------------------------------------------------------


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another rank's process (shown as the cause)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _rank_main(rank: int, size: int, device_type: str, shared_gpu: bool, init_file: str, timeout: float,
               fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(1)        # N ranks on a few cores: no thread oversubscription
    world = None
    try:
        dev = torch.device("cuda", 0 if shared_gpu else rank) if device_type == "cuda" else torch.device("cpu")
        world = World._init(rank, size, dev, f"file://{init_file}", shared_gpu, timeout)
        value = fn(world, *args)
        payload = pickle.dumps(value)
        results.put((rank, True, payload, ""))
    except BaseException as e:  # noqa: BLE001  every failure must reach the parent
        tb = traceback.format_exc()
        try:
            blob = pickle.dumps(e)
            pickle.loads(blob)
        except Exception:  # noqa: BLE001  an exception that does not survive pickling
            blob = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        results.put((rank, False, blob, tb))
    finally:
        if world is not None:
            try:
                world.close()
            except Exception:  # noqa: BLE001  the result is already delivered
                pass


def _name_rank(exc: BaseException, rank: int) -> BaseException:
    """Prefix the exception's message with ``rank r:`` (unless the message already names it)."""
    prefix = f"rank {rank}:"
    if exc.args and isinstance(exc.args[0], str):
        if not exc.args[0].startswith(prefix):
            exc.args = (f"{prefix} {exc.args[0]}",) + exc.args[1:]
    else:
        exc.args = (f"{prefix} {type(exc).__name__}{exc.args!r}",)
    return exc


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def spawn(fn: Callable, world_size: int, *args, device: str = "cpu", timeout: float = 120.0,
          share_gpu: Optional[bool] = None, grace: float = 5.0) -> list:
    """Run ``fn(world, *args)`` on ``world_size`` fresh processes; return the results by rank.

    ``device="cuda"`` gives each rank its own GPU when there are enough (NCCL), else all ranks
    share GPU 0 (gloo); ``share_gpu=True`` forces sharing. If a rank raises, the others get
    ``grace`` seconds to finish, then the world is stopped and the exception is re-raised with its
    rank named (the other ranks' failures are listed in a note). At ``timeout`` seconds every
    rank still running is killed and ``TimeoutError`` names them.
    """
    import multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        gpus = torch.cuda.device_count()       # no CUDA context is created in the parent
        if gpus == 0:
            raise RuntimeError("spawn(device='cuda') needs a GPU")
        shared = share_gpu if share_gpu is not None else gpus < world_size
    else:
        shared = False

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="tuneforge-world-")
    init_file = os.path.join(tmp, "rendezvous")
    # Children read these at start-up: eager module loading (a kernel loaded lazily while another
    # spins can deadlock), and the interpreter choice of the parent.
    saved = os.environ.get("CUDA_MODULE_LOADING")
    os.environ["CUDA_MODULE_LOADING"] = "EAGER"
    procs = []
    try:
        for r in range(world_size):
            p = ctx.Process(target=_rank_main, name=f"tuneforge-rank{r}", daemon=True,
                            args=(r, world_size, device, shared, init_file, timeout, fn, args, results))
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("CUDA_MODULE_LOADING", None)
        else:
            os.environ["CUDA_MODULE_LOADING"] = saved

    values: dict[int, Any] = {}
    failures: list[tuple[int, BaseException, str]] = []
    exited_without_result: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(failures) < world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, ok, blob, tb = results.get(timeout=min(0.1, deadline - now))
            except queue_mod.Empty:
                done = set(values) | {f[0] for f in failures}
                for r, p in enumerate(procs):
                    if r in done or p.exitcode is None:
                        continue
                    # A process that died without a message (segfault, os._exit): allow its
                    # message a moment to arrive through the queue, then report it.
                    first = exited_without_result.setdefault(r, now)
                    if now - first > 1.0:
                        failures.append((r, RuntimeError(f"exited with code {p.exitcode} without a result"), ""))
                        deadline = min(deadline, now + grace)
                continue
            if ok:
                values[rank] = pickle.loads(blob)
            else:
                failures.append((rank, pickle.loads(blob), tb))
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        _stop(procs)
        results.close()
        try:
            os.remove(init_file)
            os.rmdir(tmp)
        except OSError:
            pass

    if failures:
        rank, exc, tb = failures[0]
        exc = _name_rank(exc, rank)
        others = [f"rank {r}: {type(e).__name__}: {e}" for r, e, _ in failures[1:]]
        unfinished = [r for r in range(world_size) if r not in values and r not in {f[0] for f in failures}]
        if unfinished:
            others.append(f"ranks {unfinished} were stopped before finishing")
        if others and hasattr(exc, "add_note"):
            exc.add_note("other ranks: " + "; ".join(others))
        if tb:
            raise exc from RemoteTraceback(tb)
        raise exc
    if len(values) < world_size:
        missing = [r for r in range(world_size) if r not in values]
        raise TimeoutError(f"world of {world_size} ranks did not finish within {timeout:g}s; "
                           f"killed ranks {missing} (a rank hung, or the deadline is too short)")
    return [values[r] for r in range(world_size)]
