"""Run by test_train_distributed.py under torchrun: trains a tiny model on 2 CPU processes and
writes what this rank saw and its final weights to ``<out>/rank-<r>.json`` (a file per rank:
the ranks' stdout lines can interleave)."""

import json
import sys

import torch
from accelerate.state import PartialState

from mmkit.core.train import Callback, TrainConfig, train

seen = []


class Record(Callback):
    def on_batch_end(self, state, batch, outputs):
        seen.append((state.epoch, batch["index"].tolist()))


def loss(model, batch):
    return {"loss": ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()}


data = [{"x": torch.tensor([float(i), 1.0]), "y": torch.tensor(float(i % 3))} for i in range(16)]
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
result = train(model, loss, data, TrainConfig(epochs=2, batch_size=4, lr=0.01), sys.argv[1], callbacks=[Record()])
rank = PartialState().process_index
with open(f"{sys.argv[1]}/rank-{rank}.json", "w") as fh:
    json.dump({"rank": rank, "world": PartialState().num_processes, "step": result.step, "seen": seen,
               "w": [p.tolist() for p in model.parameters()]}, fh)
