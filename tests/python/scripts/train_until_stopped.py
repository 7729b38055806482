"""A training process for watcher tests: trains until stopped, injecting NaN at a given step.

Usage: train_until_stopped.py RUN NAN_STEP MAX_SECONDS
Exit codes: 3 when tensorvigil stopped it (TrainingStopped), 0 when it ran out of time.
Prints "committed <step> <unix time>" after each step so the test can time the watcher.
"""

import sys
import time

import torch
from torch import nn

import tensorvigil as tv

run, nan_step, max_seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
hook = tv.torch.Hook(run, collections=["losses", "gradients"], save=tv.SaveConfig(), strict=True)
hook.register(model, optimizer=opt)
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
end = time.monotonic() + max_seconds
try:
    with hook:
        step = 0
        while time.monotonic() < end:
            loss = nn.functional.cross_entropy(model(x), y)
            if step >= nan_step:
                loss = loss * float("nan")
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hook.step()  # commit now, so the watcher sees the step without waiting
            hook.flush()
            print(f"committed {step} {time.time():.3f}", flush=True)
            step += 1
            time.sleep(0.05)
except tv.TrainingStopped as e:
    print(f"stopped: {e}", flush=True)
    sys.exit(3)
