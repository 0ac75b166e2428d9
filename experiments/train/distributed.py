"""Data-parallel training and evaluation inside one job: one task per GPU, one or several nodes.

Owns everything distributed and nothing else: joining the job's process group (ranks and the master address from
submitit's ``TorchDistributedEnvironment``, or from ``torchrun``'s variables), the backend (NCCL on GPU, gloo on
CPU), the DDP wrapper, the evaluation sharding and the collectives the pipeline needs. A job with one task gets
``SINGLE`` and every helper here is then a no-op, so the pipeline has one code path.

Conventions:

- ``train.batch_size`` is per task (DeiT's convention); the effective batch is ``batch_size * world_size``.
- Evaluation shards whole batches, not images: global batch ``b`` (of the unsharded, in-order loader) runs on rank
  ``b % world_size``. No sampler padding, so no image is counted twice, and every image runs in exactly the batch
  it has in a single-process run, so the gathered per-image results, and hence top-1/top-5, the loss and the token
  counts, equal the single-process ones exactly.
- Only rank 0 writes (checkpoints, the baseline cache, records); ``barrier`` makes the others wait for a file.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

# Generous: a rank may wait in a collective while rank 0 waits for another job's baseline lock or writes a file.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: ``rank`` of ``world_size`` tasks, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # "nccl" | "gloo" when a process group is up

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


class DistributedSetupError(RuntimeError):
    """The job asks for several tasks but their process group cannot be formed (names the cause)."""


# ------------------------------------------------------------------------------------------------- setup
def job_tasks() -> Optional[dict[str, Any]]:
    """Rank, world size, local rank and master address of this task, or ``None`` when not in a multi-task job.

    Inside a submitit job (SLURM or the local executor) they come from ``submitit.helpers.TorchDistributedEnvironment``;
    under ``torchrun`` from its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` variables.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        if env.world_size <= 1:
            return None
        return {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                "master_addr": env.master_addr, "master_port": env.master_port, "source": "submitit"}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "master_addr": os.environ.get("MASTER_ADDR"),
                "master_port": os.environ.get("MASTER_PORT"), "source": "torchrun"}
    return None


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the job's process group if it has several tasks; returns this task's env and device.

    On GPU each task takes the GPU of its local rank (``cuda:<local_rank mod visible GPUs>``) and NCCL; on CPU,
    gloo. In any SLURM task, torch's thread count is set to the task's CPUs (``SLURM_CPUS_PER_TASK``): tasks
    sharing a node must not oversubscribe it (OpenMP threads spinning on shared cores slow everything tenfold).
    Ranks other than 0 then log warnings and errors only.
    """
    _limit_threads()
    tasks = job_tasks()
    if tasks is None:
        return SINGLE, device
    if dist.is_initialized():  # a caller set the group up already (tests, notebooks)
        return DistEnv(dist.get_rank(), dist.get_world_size(), tasks["local_rank"], dist.get_backend()), device
    rank, world, local_rank = tasks["rank"], tasks["world_size"], tasks["local_rank"]
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise DistributedSetupError(f"task {rank} of {world}: device is cuda but this task sees no GPU")
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    os.environ.update(MASTER_ADDR=str(tasks["master_addr"]), MASTER_PORT=str(tasks["master_port"]),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
    except Exception as error:  # noqa: BLE001 - re-raised with the job's view of the group
        raise DistributedSetupError(
            f"task {rank} of {world} could not join the process group ({backend}, master "
            f"{tasks['master_addr']}:{tasks['master_port']}, from {tasks['source']}): {error}") from error
    global _OWNED
    _OWNED = True
    atexit.register(_destroy)  # also when the run raises
    log.info("distributed: rank %d of %d (local rank %d), backend %s, device %s", rank, world, local_rank, backend,
             device)
    if rank != 0:  # the job log (Hydra's <job>.log) is shared: rank 0 reports progress, the others only problems
        logging.getLogger().setLevel(logging.WARNING)
    return DistEnv(rank, world, local_rank, backend), device


_OWNED = False  # whether setup() created the process group (it then destroys it)


def _limit_threads() -> None:
    """In a SLURM task, torch's CPU threads = the task's CPUs (tasks sharing a node must not oversubscribe it)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and cpus.isdigit() and int(cpus) > 0:
        torch.set_num_threads(int(cpus))


def _destroy() -> None:
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def teardown(env: DistEnv) -> None:
    """Leave the process group if ``setup`` created it."""
    if env.enabled:
        _destroy()


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """``model`` in DDP when the job has several tasks (parameters broadcast from rank 0), else ``model``.

    ``find_unused_parameters`` stays on: token-reduction methods may leave a predictor or gate unused in a step.
    """
    if not env.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


# ------------------------------------------------------------------------------------------- collectives
def _flag_device(env: DistEnv) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if env.backend == "nccl" else torch.device("cpu")


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def any_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective: call it on all ranks)."""
    if not env.enabled:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], device=_flag_device(env))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_flag_device(env) if env.backend == "nccl" else None)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_metrics(metrics: dict[str, float], env: DistEnv, sums: Sequence[str] = ("skipped_steps",)) -> dict[str, float]:
    """Training metrics averaged over ranks (keys in ``sums`` are added). Exact for the per-epoch means because
    ``DistributedSampler`` gives every rank the same number of samples."""
    if not env.enabled:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=_flag_device(env))
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    out = {}
    for name, value in zip(names, values.tolist()):
        out[name] = value if name in sums else value / env.world_size
        if isinstance(metrics[name], int):
            out[name] = int(round(out[name]))
    return out


# ------------------------------------------------------------------------------------------- evaluation
class BatchShardSampler(Sampler[list[int]]):
    """Batch sampler of rank ``rank``'s share of an in-order pass: global batches ``rank, rank + world, ...``.

    Batch ``b`` holds images ``[b * batch_size, (b + 1) * batch_size)``, exactly as in a single-process loader
    without shuffling; nothing is padded or repeated, so a rank may get one batch fewer (or none).
    """

    def __init__(self, num_images: int, batch_size: int, rank: int, world_size: int) -> None:
        self.num_images, self.batch_size, self.rank, self.world_size = num_images, batch_size, rank, world_size
        self.num_batches = (num_images + batch_size - 1) // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.rank, self.num_batches, self.world_size):
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_images)))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_batches, self.world_size))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, env: DistEnv) -> DataLoader:
    """This rank's evaluation loader (see ``BatchShardSampler``); ``merge_batches`` puts the results back in order."""
    sampler = BatchShardSampler(len(dataset), batch_size, env.rank, env.world_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


def merge_batches(parts: list[Any], env: DistEnv) -> list[Any]:
    """Per-batch results of every rank (from an ``eval_loader``), interleaved back into global batch order."""
    if not env.enabled:
        return parts
    per_rank = gather_objects(parts, env)
    merged = []
    for k in range(max(len(p) for p in per_rank)):
        for rank_parts in per_rank:
            if k < len(rank_parts):
                merged.append(rank_parts[k])
    return merged
