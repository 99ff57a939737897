"""Run under `accelerate launch` with 2 processes: embed_batches must return every item once."""

import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from imgembed.model import embed_batches

accelerator = Accelerator(cpu=True)
n = int(sys.argv[1])
data = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4), torch.arange(n))
loader = accelerator.prepare(DataLoader(data, batch_size=3, shuffle=False))
embeddings, labels = embed_batches(torch.nn.Identity(), loader, accelerator)
if accelerator.is_main_process:
    assert labels.tolist() == list(range(n)), labels.tolist()
    assert embeddings[:, 0].tolist() == list(range(n))
    print(f"OK {accelerator.num_processes} processes, {len(labels)} items")
