"""Trains a small MLP with a tensorvigil hook that is never closed (test helper).

Usage: torch_exit_train.py RUN_DIR EXPECTED_DIR MODE

MODE ``atexit``: train 5 steps and return normally (the hook is left open; the interpreter's
exit must close it). MODE ``kill``: after step 3, flush the hook, print ``step 3 done`` and
keep training (bounded) until the parent kills the process.

For each step ``s`` the values the hook should have saved are written (atomically) to
``EXPECTED_DIR/step{s}.npz`` before step ``s + 1`` starts, so every step a reader can see has
its expected values on disk. ``step {s} done`` is printed after each step.
"""

import os
import sys

import numpy as np
import torch
from torch import nn

import tensorvigil as tv


def save_expected(expected_dir, step, arrays):
    path = os.path.join(expected_dir, f"step{step}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def main():
    run_dir, expected_dir, mode = sys.argv[1:4]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = tv.torch.Hook(run_dir, save=tv.SaveConfig(every=1), strict=True)
    hook.register(model, opt)
    g = torch.Generator().manual_seed(1)
    steps = 5 if mode == "atexit" else 2000
    for s in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        arrays = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(model(x), y)
        hook.record_loss(loss)
        opt.zero_grad()
        loss.backward()
        arrays.update({n + "/grad": p.grad.clone().numpy() for n, p in model.named_parameters()})
        arrays["loss"] = np.float32(loss.item())
        opt.step()
        save_expected(expected_dir, s, arrays)
        if mode == "kill" and s == 3:
            hook.flush()  # steps 0..2 were committed when step 3 opened; now they are on disk
        print(f"step {s} done", flush=True)
    # No hook.close(): the hook stays referenced by the model's hooks until exit.


if __name__ == "__main__":
    main()
