"""Compressors inside a PyTorch Lightning ``Trainer`` (compress_core.integrations.lightning)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import compress_core

pytest.importorskip("lightning")

import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset

from compress_core import CompressError
from compress_core.integrations.lightning import CompressionCallback, add_compression_loss

pytestmark = pytest.mark.filterwarnings(
    # A CPU DataLoader without workers is what these tiny runs want.
    "ignore:The '.*dataloader' does not have many workers:UserWarning",
    # Lightning 2.6's own use of a torch pytree API that torch 2.13 deprecates.
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: two intra-op threads only wait on each other, and on a busy 2-core machine
    they spin (the docs example's fit measured 4.9 s with two threads, 0.44 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class Module(pl.LightningModule):
    """A user's module: its own loss, optimizer and (optionally) dict output."""

    def __init__(self, net: nn.Module, *, as_dict: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.as_dict = as_dict
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return {"loss": loss, "task": loss.detach()} if self.as_dict else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.arange(n) % 4)


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(data(n), batch_size=batch_size, shuffle=False)


def trainer(steps: int, callbacks: list, accumulate: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def pruned_channels(comp, name: str = "fc1") -> int:
    masks = comp.masks()
    if name not in masks:
        return 0
    return int((~masks[name]["weight"].any(dim=1)).sum())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_agp_masks_follow_the_schedule_one_update_per_optimizer_step(accumulate):
    torch.manual_seed(0)
    net = Net()
    comp = compress_core.create(
        "agp", net, [{"op_names": ["fc1"], "sparse_ratio": 0.5}],
        pruner="l1_norm", interval_steps=2, total_times=3,
    )  # fmt: skip
    seen: list[tuple[int, int, int]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step, pruned_channels(comp)))

    trainer(8, [CompressionCallback(comp), Record()], accumulate).fit(Module(net), loader(128))
    # agp: update u (every 2nd optimizer step) prunes 0.5 * (1 - (1 - u/3)^3) of 32 channels:
    # 11.26, 15.41, 16 -> 11, 15, 16. With accumulation, the batches that only accumulate
    # gradients leave the step count and the masks alone.
    expected = []
    for batch in range(8 * accumulate):
        step = (batch + 1) // accumulate
        u = min(step // 2, 3)
        expected.append((batch, step, math.floor(32 * 0.5 * (1 - (1 - u / 3) ** 3)) if u else 0))
    assert seen == expected
    assert comp.steps == 8
    rows = ~comp.masks()["fc1"]["weight"].any(dim=1)
    with torch.no_grad():
        hidden = net.fc1(torch.randn(5, 16))
    assert torch.equal(hidden[:, rows], torch.zeros(5, 16))


@pytest.mark.parametrize("as_dict", [False, True])
def test_the_regulariser_is_added_to_the_loss_lightning_backpropagates(as_dict):
    torch.manual_seed(0)
    net = Net()
    comp = compress_core.create(
        "slim", net, [{"op_names": ["fc1"], "sparse_ratio": 0.25}], regular_scale=0.01
    )
    x, y = data(8).tensors
    with torch.no_grad():
        task = float(F.cross_entropy(net(x), y))
    backpropagated: list[float] = []

    class Record(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            backpropagated.append(loss.item())

    module = Module(net, as_dict=as_dict)
    factors = list(comp.parameters())
    assert len(factors) == 1 and torch.equal(factors[0].detach().flatten(), torch.ones(32))
    trainer(3, [CompressionCallback(comp), Record()]).fit(module, loader())
    # Factors start at 1: the L1 term is 0.01 * 32 channels * |1| on the first batch.
    assert backpropagated[0] == pytest.approx(task + 0.32, abs=1e-6)
    assert len(backpropagated) == 3
    # Lightning's optimizer (configure_optimizers over self.parameters()) moved the factors;
    # the L1 term pulls them below 1 on average.
    assert float(factors[0].detach().abs().mean()) < 1.0
    # After fit the module's own training_step is back.
    assert "training_step" not in module.__dict__


def test_qat_counts_optimizer_steps_and_starts_quantizing_at_quant_start_step():
    torch.manual_seed(0)
    net = Net()
    comp = compress_core.create(
        "qat", net, [{"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": "int8"}],
        quant_start_step=3,
    )  # fmt: skip
    probe = torch.randn(4, 16)
    seen: list[tuple[int, int, bool]] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # Quantizing iff fc1's output differs from the float linear on its current weight.
            with torch.no_grad():
                plain = F.linear(probe, net.fc1.weight, net.fc1.bias)
                seen.append((batch_idx, comp.steps, not torch.equal(net.fc1(probe), plain)))

    trainer(5, [CompressionCallback(comp), Record()], accumulate=2).fit(Module(net), loader(80))
    # Two batches per optimizer step; quantization once 3 optimizer steps are done.
    assert seen == [(b, b // 2, b // 2 >= 3) for b in range(10)]
    assert comp.steps == 5


def lightning_run(accumulate: int) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    net = Net()
    comps = [
        compress_core.create(
            "agp", net, [{"op_names": ["fc1"], "sparse_ratio": 0.5}],
            pruner="slim", regular_scale=0.01, interval_steps=2, total_times=2,
        ),
        compress_core.create("qat", net, [{"op_names": ["fc2"]}], quant_start_step=2),
    ]  # fmt: skip
    trainer(6, [CompressionCallback(comps)], accumulate).fit(Module(net), loader(48 * accumulate))
    return net, comps


def hand_run(accumulate: int) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    net = Net()
    comps = [
        compress_core.create(
            "agp", net, [{"op_names": ["fc1"], "sparse_ratio": 0.5}],
            pruner="slim", regular_scale=0.01, interval_steps=2, total_times=2,
        ),
        compress_core.create("qat", net, [{"op_names": ["fc2"]}], quant_start_step=2),
    ]  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for i, (x, y) in enumerate(loader(48 * accumulate)):
        loss = add_compression_loss(F.cross_entropy(net(x), y), comps)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
            for comp in comps:
                comp.step()
    return net, comps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_lightning_run_equals_the_same_training_by_hand(accumulate):
    net, comps = lightning_run(accumulate)
    ref, ref_comps = hand_run(accumulate)
    state, expected = net.state_dict(), ref.state_dict()
    assert state.keys() == expected.keys()
    # The slim factors and qat's observers are in the state dict as well as the weights.
    assert any("slim_factor" in k for k in state) and len(state) > 4
    for key in expected:
        assert torch.allclose(state[key], expected[key], atol=1e-6, rtol=0), key
    assert [c.steps for c in comps] == [c.steps for c in ref_comps] == [6, 6]
    assert pruned_channels(comps[0]) == pruned_channels(ref_comps[0]) == 16


def test_an_optimizer_that_misses_the_compressors_tensors_is_refused():
    net = Net()
    comp = compress_core.create("slim", net, [{"op_names": ["fc1"], "sparse_ratio": 0.25}])

    class OnlyFc2(Module):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.fc2.parameters(), lr=0.1)

    module = OnlyFc2(net)
    with pytest.raises(CompressError, match=r"net\.fc1\.weight__pruning_slim_factor \(slim\)"):
        trainer(2, [CompressionCallback(comp)]).fit(module, loader())
    assert "training_step" not in module.__dict__


def test_the_module_gets_its_training_step_back_when_fit_fails():
    net = Net()
    comp = compress_core.create("slim", net, [{"op_names": ["fc1"], "sparse_ratio": 0.25}])
    wrapped: list[bool] = []

    class Failing(Module):
        def training_step(self, batch, batch_idx):
            wrapped.append("training_step" in self.__dict__)
            if batch_idx == 1:
                raise RuntimeError("out of data")
            return super().training_step(batch, batch_idx)

    module = Failing(net)
    with pytest.raises(RuntimeError, match="out of data"):
        trainer(4, [CompressionCallback(comp)]).fit(module, loader())
    assert wrapped == [True, True]
    assert "training_step" not in module.__dict__


def test_manual_optimization_adds_the_loss_through_the_callback():
    class Manual(Module):
        def __init__(self, net, callback):
            super().__init__(net)
            self.automatic_optimization = False
            self.callback = callback
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.callback.loss(F.cross_entropy(self.net(x), y))
            self.losses.append(loss.item())
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    torch.manual_seed(0)
    net = Net()
    comp = compress_core.create(
        "slim", net, [{"op_names": ["fc1"], "sparse_ratio": 0.25}], regular_scale=0.01
    )
    x, y = data(8).tensors
    with torch.no_grad():
        task = float(F.cross_entropy(net(x), y))
    with pytest.raises(CompressError, match="add_loss=False"):
        trainer(2, [CompressionCallback(comp)]).fit(Manual(net, None), loader())
    callback = CompressionCallback(comp, add_loss=False)
    module = Manual(net, callback)
    trainer(3, [callback]).fit(module, loader())
    assert module.losses[0] == pytest.approx(task + 0.32, abs=1e-6)
    assert len(module.losses) == 3


def ddp_compressors(net: nn.Module) -> list:
    # qat on weights only: activation ranges are per-rank EMAs during training, which a
    # single process over the whole batch would not reproduce.
    return [
        compress_core.create(
            "agp", net, [{"op_names": ["fc1"], "sparse_ratio": 0.5}],
            pruner="slim", regular_scale=0.01, interval_steps=2, total_times=2,
        ),
        compress_core.create(
            "qat", net, [{"op_names": ["fc2"], "target_names": ["weight"]}], quant_start_step=2
        ),
    ]  # fmt: skip


DDP_SCRIPT = """
import json, os, sys
import torch
from torch.utils.data import DataLoader, DistributedSampler
import test_integrations_lightning as t
from compress_core.integrations.lightning import CompressionCallback

torch.manual_seed(0)
net = t.Net()
comps = t.ddp_compressors(net)
trainer = t.pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=6, callbacks=[CompressionCallback(comps)],
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    use_distributed_sampler=False,
)
# Lightning's own sampler would shuffle the training set; in order and 4 per rank, the two
# ranks' batches together are the single process's batch of 8.
data = t.data(48)
sampler = DistributedSampler(
    data, num_replicas=2, rank=int(os.environ["RANK"]), shuffle=False
)
trainer.fit(t.Module(net), DataLoader(data, batch_size=4, sampler=sampler))
rank = trainer.global_rank
torch.save(
    {"state": net.state_dict(), "steps": [c.steps for c in comps]},
    os.path.join(sys.argv[1], f"rank{rank}.pt"),
)
"""


@pytest.mark.slow
def test_ddp_over_two_ranks_equals_one_process_over_the_whole_batch(tmp_path):
    # ~15 s on two cores: torchrun starts two processes that each import Lightning.
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    if not torch.distributed.is_available():  # pragma: no cover
        pytest.skip("torch.distributed is not built")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path),
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stdout + launch.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    torch.manual_seed(0)
    ref = Net()
    comps = ddp_compressors(ref)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in loader(48, batch_size=8):
        loss = add_compression_loss(F.cross_entropy(ref(x), y), comps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for comp in comps:
            comp.step()
    expected = ref.state_dict()
    for result in ranks:
        assert result["steps"] == [6, 6]
        assert result["state"].keys() == expected.keys()
        for key in expected:
            # Gradients averaged over ranks sum in another order than one batch's mean.
            assert torch.allclose(result["state"][key], expected[key], atol=1e-6, rtol=0), key
    assert pruned_channels(comps[0]) == 16
    mask = "fc1.weight__pruning_mask"
    assert torch.equal(ranks[0]["state"][mask], ranks[1]["state"][mask])


def test_the_docs_example_runs_and_prunes_what_it_says():
    pytest.importorskip("sklearn")
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = doc[doc.index("## PyTorch Lightning") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    namespace: dict[str, object] = {"__name__": "integrations_md_lightning"}
    exec(compile(code, "docs/integrations.md[Lightning]", "exec"), namespace)
    # 0.75 of 128 hidden units; measured held-out accuracy 0.899 (0.906 without compression).
    assert namespace["pruned"] == 96
    assert namespace["accuracy"] > 0.87
