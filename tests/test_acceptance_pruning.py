"""The classic acceptance case of issue 3, for every pruning method.

conv1(1->16), bn1, conv2(16->32, groups=4), bn2, conv3(16->32), bn3, fc1, fc2, where the forward
adds bn2(conv2(x)) + bn3(conv3(x)): conv2 and conv3 must be pruned at identical channels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_core


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.bn3(self.conv3(x)))
        x = x.mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


CONFIG = [
    {"op_types": ["Linear"], "exclude_op_names": ["fc2"], "sparse_ratio": 0.75, "granularity": "out_channel"},
    {"op_names": ["conv1", "conv2", "conv3"], "sparse_ratio": 0.75, "granularity": "out_channel"},
]
EXPLICIT = [
    CONFIG[0],
    {"op_names": ["conv1"], "sparse_ratio": 0.75, "granularity": "out_channel"},
    {"op_names": ["conv2", "conv3"], "sparse_ratio": 0.75, "granularity": "out_channel", "dependency_group_id": "add"},
]

METHODS = [
    ("level", {}),
    ("l1_norm", {}),
    ("l2_norm", {}),
    ("fpgm", {}),
    ("slim", {"regular_scale": 1e-3}),
    ("taylor", {"training_steps": 2}),
    ("movement", {"warmup_step": 0, "cooldown_begin_step": 2}),
    ("linear", {"pruner": "l1_norm", "interval_steps": 1, "total_times": 2}),
    ("agp", {"pruner": "taylor", "training_steps": 1, "interval_steps": 1, "total_times": 2}),
]


def prune(method: str, params: dict, config: list[dict]) -> tuple[Net, dict]:
    torch.manual_seed(0)
    model = Net()
    comp = compress_core.create(method, model, config, **params)
    extra = list(comp.parameters())
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if all(p is not e for e in extra)] + extra, lr=0.01
    )
    for _ in range(3):
        loss = model(torch.randn(4, 1, 8, 8)).square().mean() + comp.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        comp.step()
    return model, comp.compress()


def check(masks: dict) -> None:
    rows = {}
    for name, channels in (("conv1", 16), ("conv2", 32), ("conv3", 32), ("fc1", 16)):
        weight = masks[name]["weight"]
        flat = weight.reshape(weight.shape[0], -1)
        # out_channel: each row is kept or pruned whole.
        assert torch.equal(flat.all(1), flat.any(1)), name
        kept = flat[:, 0]
        assert int((~kept).sum()) == channels * 3 // 4, name
        assert torch.equal(masks[name]["bias"], kept), name
        rows[name] = kept
    assert torch.equal(rows["conv2"], rows["conv3"])
    assert "fc2" not in masks and "bn1" not in masks


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_explicit_dependency_group(method, params):
    model, masks = prune(method, params, EXPLICIT)
    check(masks)
    # The masked model really computes with the pruned channels at zero.
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = model.conv3(torch.relu(model.bn1(model.conv1(x))))
    assert torch.all(y[:, ~masks["conv3"]["bias"]] == 0)


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_automatic_dependency_group(method, params):
    auto = getattr(compress_core, "auto_set_dependency_group_ids", None)
    if auto is None:
        pytest.skip("compress_core.auto_set_dependency_group_ids is not implemented yet")
    config = auto(Net(), CONFIG, (torch.randn(1, 1, 8, 8),))
    _, masks = prune(method, params, config)
    check(masks)
