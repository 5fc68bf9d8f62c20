"""SyncBatchNorm in the efficient model: two processes with half batches act as one with all."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import DenseNet

CONFIG = dict(growth_rate=3, block_config=(2, 2), num_init_features=4, bn_size=2,
              efficient=True)
BATCH = 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 8, 8, dtype=torch.float64, generator=generator)


def loss_of(logits):
    return logits.square().mean() + logits[:, 0].mean()


def run_rank(rank, world_size, port, folder, recompute):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = DenseNet(recompute_bottleneck=recompute, **CONFIG).double()
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        half = inputs().chunk(world_size)[rank]
        # A mean over equal halves: the ranks' average gradient is the full batch's (as in DDP).
        logits = model(half)
        loss_of(logits).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
            g /= world_size
        torch.save(dict(logits=logits.detach(), grads=grads, buffers=dict(model.named_buffers())),
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def reference(recompute):
    torch.manual_seed(0)
    model = DenseNet(recompute_bottleneck=recompute, **CONFIG).double()
    logits = model(inputs())
    loss_of(logits).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, \
        dict(model.named_buffers())


def test_sync_batchnorm_two_processes_equal_one_full_batch(tmp_path):
    for recompute in (False, True):
        mp.spawn(run_rank, args=(2, free_port(), str(tmp_path), recompute), nprocs=2)
        ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
        logits, grads, buffers = reference(recompute)
        torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits)
        for rank in ranks:
            for name, grad in grads.items():
                torch.testing.assert_close(rank["grads"][name], grad, msg=name)
            for name, buffer in buffers.items():
                torch.testing.assert_close(rank["buffers"][name], buffer, msg=name)
