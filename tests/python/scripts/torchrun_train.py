"""One rank of a DistributedDataParallel training (gloo, CPU), started by ``torchrun``.

Usage: torchrun --nproc_per_node N torchrun_train.py OUT_DIR FAULT STEPS

Every rank writes its own stream of the run OUT_DIR (weights, gradients, losses every step).
FAULT injects one fault from step STEPS // 2 on:

- ``none``: a healthy run.
- ``nan-rank``: rank 2's loss is NaN (a bad shard of data on one rank).
- ``desync``: rank 1's weights drift from the others' (a replica that missed a broadcast).
- ``die``: rank 3 exits without closing its hook (a dead rank); the others finish.

Prints "rank R done" at the end.
"""

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import tensorvigil as tv


def main() -> None:
    out_dir, fault, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    hook = tv.torch.Hook(
        out_dir,
        collections=["weights", "gradients", "losses"],
        save=tv.SaveConfig(every=1),
        strict=True,
    ).register(ddp, opt)
    g = torch.Generator().manual_seed(1000 + rank)
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(7))
    for step in range(steps):
        if fault == "die" and rank == 3 and step == steps // 2:
            os._exit(0)  # no close, no END frame: a dead rank
        x = torch.randn(32, 8, generator=g)
        y = (x @ w).argmax(1)
        # After rank 3 died, the survivors stop synchronising (no collective would return).
        alone = fault == "die" and step >= steps // 2
        with ddp.no_sync() if alone else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(ddp(x), y)
            if fault == "nan-rank" and rank == 2 and step >= steps // 2:
                loss = loss * float("nan")
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
        opt.step()
        if fault == "desync" and rank == 1 and step >= steps // 2:
            with torch.no_grad():
                model[0].weight.mul_(1.05)
    hook.close()
    if fault != "die":
        dist.barrier()
        dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)
    if fault == "die":
        os._exit(0)  # skip the process-group teardown, which would wait for rank 3


if __name__ == "__main__":
    main()
