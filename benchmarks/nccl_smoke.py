"""NCCL smoke test: SPP training steps under DDP with the NCCL backend, one process per visible GPU.

    torchrun --nproc_per_node=NGPU benchmarks/nccl_smoke.py

Each rank trains a tiny pruned Llama with SPP for a few steps on its own batch; DDP all-reduces the adapter
gradients over NCCL. Checks: the adapters are identical on every rank after the steps, the loss is finite,
and the base's zeros are kept after merging. Prints one line ``NCCL OK ...`` (rank 0) or raises.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main() -> int:
    from peft import get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from spp_peft import SPPConfig
    from spp_peft.testing import tiny_llama
    from spp_peft.pruning import prune
    from spp_peft.sparsity import assert_same_sparsity

    # gloo on CPU checks this script itself where there is no GPU; the figures mean nothing there.
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    base = tiny_llama().to(device)
    prune(base, method="magnitude", pattern="2:4")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SPPConfig(r=4, init_weights=False))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=generator).to(device)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "adapters differ between ranks"
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    merged = model.merge_and_unload()
    assert_same_sparsity(reference, merged.state_dict())
    if rank == 0:
        print(f"{'NCCL' if cuda else 'gloo (CPU)'} OK world={world} loss={loss.item():.4f} adapters identical, zeros kept")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
