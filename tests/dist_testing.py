"""Spawning CPU process groups (gloo over loopback/file store) for the distributed tests."""
import datetime
import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    fn(rank, world, *args)
    # Tear down together: a rank leaving while its peer's gloo threads still talk to it aborts.
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """Runs fn(rank, world, *args) in `world` fresh processes; a failure on any rank fails the
    caller (mp.spawn re-raises it). fn must be a module-level function."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "store"), fn, args), nprocs=world, join=True)
