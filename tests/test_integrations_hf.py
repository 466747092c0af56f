"""Compressors inside a Hugging Face ``Trainer`` (compress_core.integrations.hf)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compress_core

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback, TrainingArguments

from compress_core.integrations.hf import CompressionTrainer, add_compression_loss


class Net(nn.Module):
    """Returns ``{"loss", "logits"}`` like a Hugging Face model, so the Trainer finds the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 4)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.fc2(self.relu(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(16, generator=g), "labels": torch.tensor(i % 4)} for i in range(n)]


def args(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )


def pruned_channels(comp, name: str = "fc1") -> int:
    masks = comp.masks()
    if name not in masks:
        return 0
    return int((~masks[name]["weight"].any(dim=1)).sum())


def test_agp_masks_follow_the_schedule_one_update_per_interval(tmp_path):
    torch.manual_seed(0)
    model = Net()
    comp = compress_core.create(
        "agp", model, [{"op_names": ["fc1"], "sparse_ratio": 0.5}],
        pruner="l1_norm", interval_steps=2, total_times=3,
    )  # fmt: skip
    seen: list[tuple[int, int]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((state.global_step, pruned_channels(comp)))

    trainer = CompressionTrainer(
        model=model, args=args(tmp_path, 8), train_dataset=dataset(), compressors=[comp],
        callbacks=[Record()],
    )  # fmt: skip
    trainer.train()
    # agp: update u (every 2nd optimizer step) prunes 0.5 * (1 - (1 - u/3)^3) of 32 channels:
    # 11.26, 15.41, 16 -> 11, 15, 16 (floor and round agree on these).
    expected = []
    for step in range(1, 9):
        u = min(step // 2, 3)
        expected.append((step, math.floor(32 * 0.5 * (1 - (1 - u / 3) ** 3)) if u else 0))
    assert seen == expected
    assert pruned_channels(comp) == 16
    # The model trained through the masks: the pruned rows stay zero in the forward.
    rows = ~comp.masks()["fc1"]["weight"].any(dim=1)
    with torch.no_grad():
        hidden = model.fc1(torch.randn(5, 16))
    assert torch.equal(hidden[:, rows], torch.zeros(5, 16))


def test_the_regulariser_is_added_and_its_factors_are_trained(tmp_path):
    torch.manual_seed(0)
    model = Net()
    comp = compress_core.create(
        "slim", model, [{"op_names": ["fc1"], "sparse_ratio": 0.25}], regular_scale=0.01
    )
    trainer = CompressionTrainer(
        model=model, args=args(tmp_path, 4), train_dataset=dataset(), compressors=[comp]
    )
    batch = {
        "x": torch.stack([d["x"] for d in dataset(8)]),
        "labels": torch.stack([d["labels"] for d in dataset(8)]),
    }
    # Factors start at 1: the L1 term is 0.01 * 32 channels * |1|.
    with torch.no_grad():
        task = model(**batch)["loss"]
        total = trainer.compute_loss(model, batch)
    assert float(total) == pytest.approx(float(task) + 0.32, abs=1e-6)
    factors = list(comp.parameters())
    assert len(factors) == 1 and torch.equal(factors[0].detach().flatten(), torch.ones(32))
    trainer.train()
    # The Trainer's own optimizer (built from model.parameters()) moved the factors; the L1
    # term pulls them below 1 on average.
    assert not torch.equal(factors[0].detach().flatten(), torch.ones(32))
    assert float(factors[0].detach().abs().mean()) < 1.0


def test_a_distiller_weights_what_came_before_it():
    class Distiller:
        origin_loss_lambda = 0.5

        def total_loss(self, task: torch.Tensor) -> torch.Tensor:
            return self.origin_loss_lambda * task + torch.tensor(2.0)

    class Regulariser:
        def loss(self) -> torch.Tensor:
            return torch.tensor(1.0)

    task = torch.tensor(4.0)
    # (4 + 1) * 0.5 + 2: order matters, as in a hand-written loop.
    assert float(add_compression_loss(task, [Regulariser(), Distiller()])) == 4.5
    assert float(add_compression_loss(task, [Distiller(), Regulariser()])) == 5.0
