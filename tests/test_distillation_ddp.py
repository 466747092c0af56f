"""Distillation under DistributedDataParallel: two gloo processes on CPU.

Each rank trains the DDP-wrapped student on its half of one global batch, with an adapter
(``adaptive1d_layerwise``, student width 5 -> teacher width 8) and a KL target. DDP averages
the student's gradients; the distiller averages its adapters' gradients. Every loss term is a
mean over the batch (``mse`` mean, ``kl`` batchmean, cross-entropy mean) and the halves are
equal, so the ranks must stay bitwise identical and match one process training on the whole
batch.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import compress_core

STEPS = 4
CONFIG = [{"op_names": ["fc1"]}, {"op_names": ["fc2"], "apply_method": "kl", "lambda": 0.5}]


class Mlp(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def build() -> tuple[nn.Module, nn.Module, compress_core.Compressor]:
    torch.manual_seed(0)
    teacher, student = Mlp(8), Mlp(5)
    x, _ = batch()
    comp = compress_core.create(
        "adaptive1d_layerwise", student, CONFIG, teacher=teacher, example_inputs=(x[:2],), origin_loss_lambda=0.7
    )
    return teacher, student, comp


def train(model: nn.Module, comp: compress_core.Compressor, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    optimizer = torch.optim.SGD([*model.parameters(), *comp.parameters()], lr=0.2)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = comp.total_loss(F.cross_entropy(model(x), y))
        loss.backward()
        optimizer.step()
        comp.step()
        losses.append(loss.item())
    return losses


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        _, student, comp = build() if rank == 0 else _build_other_seed()
        model = nn.parallel.DistributedDataParallel(student)
        x, y = batch()
        half = x.shape[0] // world
        losses = train(model, comp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        grads = [p.grad.clone() for p in comp.parameters()]
        torch.save(
            {"student": student.state_dict(), "adapters": comp.state_dict(), "losses": losses, "grads": grads},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _build_other_seed() -> tuple[nn.Module, nn.Module, compress_core.Compressor]:
    torch.manual_seed(0)
    teacher, student = Mlp(8), Mlp(5)
    torch.manual_seed(99)  # adapter init differs from rank 0 until the broadcast
    x, _ = batch()
    comp = compress_core.create(
        "adaptive1d_layerwise", student, CONFIG, teacher=teacher, example_inputs=(x[:2],), origin_loss_lambda=0.7
    )
    return teacher, student, comp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(tmp_path: Path):
    mp.spawn(worker, args=(2, f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    _, student, comp = build()
    x, y = batch()
    reference_losses = train(student, comp, x, y)

    for name, value in ranks[0]["student"].items():
        assert torch.equal(value, ranks[1]["student"][name]), name
        assert torch.allclose(value, student.state_dict()[name], atol=1e-5), name
    assert set(ranks[0]["adapters"]) == {"fc1/_output_.weight", "fc1/_output_.bias"}
    for name, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][name]), name
        assert torch.allclose(value, comp.state_dict()[name], atol=1e-5), name
    for rank in ranks:
        assert all(math.isfinite(v) for v in rank["losses"])
        assert all(torch.isfinite(g).all() for g in rank["grads"])
    # The global loss is the mean of the ranks' losses (equal halves, mean-reduced terms).
    for step in range(STEPS):
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert mean == pytest.approx(reference_losses[step], rel=1e-5)
    assert reference_losses[-1] < reference_losses[0]
