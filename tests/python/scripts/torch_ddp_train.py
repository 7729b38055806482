"""One rank of a 2-rank DistributedDataParallel (gloo, CPU) training with a hook (test helper).

Usage: torch_ddp_train.py OUT_DIR

Needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment. Trains twice in one
process group: with ``ranks="all"`` into the run ``OUT_DIR/all`` and with ``ranks="zero"`` into
``OUT_DIR/zero``. Parameters are initialised differently on each rank (DDP broadcasts rank 0's)
and each rank trains on its own data. The values the hook should have saved on this rank go to
``OUT_DIR/{all,zero}-rank{RANK}.npz`` (keys ``{name}@{step}``).
"""

import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import tensorvigil as tv

STEPS = 3


def train(out_dir, ranks, rank):
    torch.manual_seed(100 + rank)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(6, 8))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(8, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    hook = tv.torch.Hook(
        os.path.join(out_dir, ranks),
        collections=["weights", "biases", "gradients", "losses"],
        save=tv.SaveConfig(every=1),
        strict=True,
        ranks=ranks,
    ).register(ddp, opt)
    g = torch.Generator().manual_seed(rank)
    expected = {}
    with hook:
        for s in range(STEPS):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            for n, p in model.named_parameters():
                expected[f"{n}@{s}"] = p.detach().clone().numpy()
            loss = nn.functional.cross_entropy(ddp(x), y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            for n, p in model.named_parameters():
                expected[f"{n}/grad@{s}"] = p.grad.clone().numpy()
            expected[f"loss@{s}"] = np.float32(loss.item())
            opt.step()
    np.savez(os.path.join(out_dir, f"{ranks}-rank{rank}.npz"), **expected)


def main():
    out_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    for ranks in ("all", "zero"):
        train(out_dir, ranks, rank)
        dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
