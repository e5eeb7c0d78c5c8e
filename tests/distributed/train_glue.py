"""spp_peft.training.train under a multi-process launch (run by test_training_glue.py): one process group,
rank 0 alone holds and writes the output folder."""

import os
import sys

import torch.distributed as dist

from spp_peft.pruning import prune
from spp_peft.testing import byte_tokenizer, tiny_llama
from spp_peft.training import DataConfig, TrainConfig, build_dataset, prepare_model, train

model = tiny_llama()
prune(model, method="magnitude", pattern="2:4", show_progress=False)
tok = byte_tokenizer()
ds = build_dataset(tok, DataConfig(source="builtin", cutoff_len=32, max_samples=16))
cfg = TrainConfig(r=4, max_steps=3, batch_size=2, lr=1e-2, save_steps=0, progress=False)
res = train(prepare_model(model, "spp", cfg), tok, "spp", ds, cfg, sys.argv[1])
world = dist.get_world_size() if dist.is_initialized() else 1
print(f"RANK {os.environ.get('RANK')} world {world} steps {res.steps} adapter {res.adapter_dir}")
