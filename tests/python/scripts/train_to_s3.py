"""A training process writing its run to object storage (endpoint from AWS_ENDPOINT_URL).

Usage: train_to_s3.py URL STEPS NAN_STEP SLEEP VALUES_NPZ
Saves weights, gradients and the loss every step with shards rolled every 0.3 s; from step
NAN_STEP on the loss is NaN. Writes the weights it trained with to VALUES_NPZ (for read-back
comparison). Exit codes: 3 when tensorvigil stopped it, 0 when it ran all steps.
Prints "committed <step>" after each step.
"""

import sys
import time

import numpy as np
import torch
from torch import nn

import tensorvigil as tv

url, steps, nan_step, pause, out = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]),
    sys.argv[5],
)
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
hook = tv.torch.Hook(
    url,
    collections=["weights", "gradients", "losses"],
    save=tv.SaveConfig(every=1),
    strict=True,
    writer_options={"roll_seconds": 0.3, "upload_interval": 0.1, "fsync": False},
)
hook.register(model, optimizer=opt)
x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
saved = {}
try:
    with hook:
        for step in range(steps):
            saved[f"{step}"] = model[0].weight.detach().numpy().copy()
            loss = nn.functional.cross_entropy(model(x), y)
            if step >= nan_step:
                loss = loss * float("nan")
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hook.step()
            print(f"committed {step}", flush=True)
            time.sleep(pause)
except tv.TrainingStopped as e:
    print(f"stopped: {e}", flush=True)
    np.savez(out, **saved)
    sys.exit(3)
np.savez(out, **saved)
