"""Run by tests/test_multiprocess.py under torchrun (2 processes, gloo): each process holds its own
shards of a 400 MB state (4 x 100 MB tensors, DTensor Shard(0)), then fsdp.gathered gathers it the way
train.save does (keep on the main process only). Writes each rank's peak-RSS growth to OUT/rank<r>.json."""

import json
import os
import resource
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fsdp  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
n = 25_000_000  # floats per whole tensor: 100 MB
state = {f"t{i}": DTensor.from_local(torch.full((n // world,), float(i + rank)), mesh, [Shard(0)]) for i in range(4)}
small = fsdp.gathered({"w": DTensor.from_local(torch.ones(4), mesh, [Shard(0)])}, keep=True)  # collectives warmed up
before = peak_mb()
kept = fsdp.gathered(state, keep=rank == 0)
after = peak_mb()
if rank == 0:
    assert all(kept[f"t{i}"].shape == (n,) and kept[f"t{i}"][-1].item() == i + world - 1 for i in range(4))
else:
    assert kept is None
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(dict(rank=rank, before_mb=before, growth_mb=after - before), f)
del state, small, kept  # every DTensor and gathered tensor freed while the process group still exists
dist.barrier()  # neither process tears gloo down while the other still uses it
dist.destroy_process_group()
