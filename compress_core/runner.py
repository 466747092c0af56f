"""``compress run``: execute a run file end to end and write a finished output folder.

Everything is written into a hidden sibling folder (``.<name>.partial-<pid>``) that is renamed
into place only when every step, the report and the plots are done, so a failed run never
leaves anything that looks like a finished result (the previous result, if any, stays).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from .errors import CompressError, ConfigError
from .integrations._loss import add_compression_loss
from .runfile import (
    DEFAULT_LR,
    LOSSES,
    METHOD_KIND,
    DistillStep,
    ExportStep,
    PruneStep,
    QuantizeStep,
    RunFile,
    TrainStep,
    load_runfile,
)

__all__ = [
    "BUILTIN_LOSSES",
    "StageResult",
    "accuracy",
    "check_against_model",
    "cosine_loss",
    "run",
    "run_file",
    "select_device",
]

MARKER = "run.json"


@attrs.define
class StageResult:
    """One row of the report: the model after a stage."""

    name: str
    metric: float
    parameters: int
    flops: int
    latency_ms: float
    int8_latency_ms: float | None
    size_bytes: int
    size_note: str
    seconds: float


def accuracy(model: Callable[..., Any], batches: Iterable[Any]) -> float:
    """Top-1 accuracy in percent over ``(inputs, labels)`` batches (the default evaluation)."""
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


# -- losses ---------------------------------------------------------------------------------


def cosine_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1 - cosine similarity`` of each output to its label along the last dim, batch mean."""
    return (1.0 - nn.functional.cosine_similarity(outputs, labels, dim=-1)).mean()


BUILTIN_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
    "cosine": cosine_loss,
}
"""The run file's built-in ``loss`` names, each called as ``fn(outputs, labels)``."""
assert set(BUILTIN_LOSSES) == set(LOSSES)


def _trains(step: Any) -> bool:
    if isinstance(step, (TrainStep, DistillStep)):
        return True
    return isinstance(step, (PruneStep, QuantizeStep)) and step.epochs is not None


def _resolve_losses(runfile: RunFile) -> dict[int, Callable[..., torch.Tensor]]:
    """The loss function of every step that trains, by step index.

    Import paths are imported here, before the model is built, so that a bad one is a
    ConfigError naming the key that set it (the step's ``loss`` or the top-level one).
    """
    found: dict[int, Callable[..., torch.Tensor]] = {}
    loaded: dict[str, Callable[..., torch.Tensor]] = {}
    for i, step in enumerate(runfile.parsed_steps()):
        if not _trains(step):
            continue
        spec = step.loss or runfile.loss
        where = f"steps[{i}].loss" if step.loss else "loss"
        if spec in BUILTIN_LOSSES:
            found[i] = BUILTIN_LOSSES[spec]
            continue
        if spec not in loaded:
            fn = _resolve(spec, runfile.base_dir, where)
            if not callable(fn):
                raise ConfigError(
                    f"{spec!r} is a {type(fn).__name__}, not a function (outputs, labels) -> loss",
                    key=where,
                )
            loaded[spec] = fn
        found[i] = loaded[spec]
    return found


# -- devices --------------------------------------------------------------------------------


def select_device(
    setting: str = "auto",
    *,
    local_rank: int | None = None,
    cuda_available: bool | None = None,
    device_count: int | None = None,
) -> tuple[str, str]:
    """The torch device of this process and the process-group backend that goes with it.

    ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` is
    ``cuda:LOCAL_RANK`` and requires CUDA. The backend is ``nccl`` for CUDA and ``gloo`` for
    the CPU (NCCL reduces only CUDA tensors, gloo is the CPU backend).

    :param local_rank: default ``LOCAL_RANK`` from the environment (set by torchrun), else 0.
    :param cuda_available: default ``torch.cuda.is_available()``.
    :param device_count: default ``torch.cuda.device_count()`` when CUDA is available.
    :raises ConfigError: ``cuda`` without CUDA, or a local rank without a GPU of its own.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and not cuda_available):
        return "cpu", "gloo"
    if setting not in ("auto", "cuda"):
        raise ConfigError(f"must be one of auto, cpu, cuda; got {setting!r}", key="device")
    if not cuda_available:
        raise ConfigError(
            "'cuda' was asked for but torch sees no CUDA device (use auto or cpu)", key="device"
        )
    if device_count is None:
        device_count = torch.cuda.device_count()
    if local_rank >= device_count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own ({device_count} visible); "
            "start at most one process per GPU or use device: cpu",
            key="device",
        )
    return f"cuda:{local_rank}", "nccl"


def _on(device: torch.device, batches: Iterable[Any]) -> Iterable[Any]:
    """``(inputs, labels)`` batches moved to ``device`` (other batch forms pass unchanged)."""
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            yield type(batch)(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch)
        elif isinstance(batch, torch.Tensor):
            yield batch.to(device)
        else:
            yield batch


# -- validation against the model -----------------------------------------------------------


def check_against_model(runfile: RunFile, model: nn.Module) -> None:
    """Check every step's method, params and config list on ``model`` before anything runs.

    :raises ConfigError: with paths like ``steps[1].config_list[0].sparse_ratio``.
    """
    from .canonical import canonicalize
    from .errors import UnknownMethodError
    from .orchestrator import _structure_params
    from .registry import get_host

    host = get_host()
    for i, step in enumerate(runfile.parsed_steps()):
        kind = METHOD_KIND.get(type(step))
        if kind is None:
            continue
        where = f"steps[{i}]"
        try:
            info = host.method(step.method)
        except UnknownMethodError as exc:
            raise ConfigError(str(exc), key=f"{where}.method") from None
        if info.kind != kind:
            raise ConfigError(
                f"'{info.name}' is a {info.kind} method; a {type(step).__name__[:-4].lower()} step needs a {kind} method",
                key=f"{where}.method",
            )
        params = dict(step.params)
        if isinstance(step, DistillStep):
            if "teacher" in params:
                raise ConfigError(
                    "the teacher is the model before the first prune step; do not set it",
                    key=f"{where}.params.teacher",
                )
            params["teacher"] = model
        try:
            _structure_params(info.compressor, params, info.name)
        except ConfigError as exc:
            raise ConfigError(
                exc.reason, key=f"{where}.params" + (f".{exc.key}" if exc.key else "")
            ) from None
        if (
            isinstance(step, (PruneStep, QuantizeStep))
            and step.epochs is None
            and getattr(info.compressor, "needs_training", False)
        ):
            raise ConfigError(
                f"'{info.name}' learns from training steps (loss.backward() and comp.step()); "
                "set epochs (and optionally lr, max_batches, loss) on this step",
                key=f"{where}.epochs",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the same warnings come when the step runs
                canonicalize(
                    model,
                    list(step.config_list),
                    kind,
                    setting_cls=info.compressor.setting_cls,
                    host=host,
                )
        except ConfigError as exc:
            path = f"{where}.config_list"
            if exc.entry is not None:
                path += f"[{exc.entry}]"
            if exc.key:
                path += f".{exc.key}"
            raise ConfigError(exc.reason, key=path, module=exc.module) from None


# -- measurements ---------------------------------------------------------------------------


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: nn.Module, example: tuple[Any, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example)
    return int(counter.get_total_flops())


def _latency_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _float_size(model: nn.Module) -> int:
    import safetensors.torch

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return len(safetensors.torch.save(state))


class OrtModel:
    """An onnxruntime session called like a model: ``OrtModel(path)(x) -> tensor``."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[:1]
        return torch.from_numpy(out).to(x.device)

    def eval(self) -> OrtModel:
        return self


# -- the run ------------------------------------------------------------------------------


class _Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars = not quiet and sys.stderr.isatty()

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def progress(
        self, iterable: Iterable[Any], desc: str, total: int | None = None
    ) -> Iterable[Any]:
        from tqdm import tqdm

        return tqdm(
            iterable, desc=desc, total=total, disable=not self.bars, leave=False, file=sys.stderr
        )


def _resolve(spec: str, base_dir: str, where: str) -> Any:
    from .cli import load_factory

    module, _, attr = spec.rpartition(":")
    if module.endswith(".py") and not os.path.isabs(module):
        spec = f"{Path(base_dir) / module}:{attr}"
    elif Path.cwd().as_posix() not in sys.path and str(Path.cwd()) not in sys.path:
        # Like `python -m`: packages in the current directory are importable.
        sys.path.insert(0, str(Path.cwd()))
    try:
        return load_factory(spec)
    except ConfigError as exc:
        raise ConfigError(exc.reason, key=where) from None
    except ImportError as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}", key=where) from None


def _batches(loader: Iterable[Any], limit: int | None) -> Iterable[Any]:
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


def _len(loader: Any, limit: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


# -- torch.distributed ------------------------------------------------------------------------


@attrs.define(frozen=True)
class _Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_SINGLE = _Ranks()


def _init_distributed(backend: str = "gloo") -> tuple[_Ranks, bool]:
    """The ranks of this process; initialises the process group when launched by torchrun.

    Returns ``(ranks, created)``: ``created`` says whether this call made the group (and so
    must destroy it).
    """
    from .distributed import is_distributed

    if is_distributed():
        import torch.distributed as dist

        return _Ranks(dist.get_rank(), dist.get_world_size()), False
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return _SINGLE, False
    import torch.distributed as dist

    # The backend follows the run's device (select_device): NCCL reduces only CUDA tensors,
    # gloo is the CPU's. A group the caller initialised itself is used as it is, above.
    dist.init_process_group(backend)
    return _Ranks(dist.get_rank(), dist.get_world_size()), True


def _barrier(ranks: _Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _shard(batches: Iterable[Any], ranks: _Ranks) -> Iterable[Any]:
    """This rank's slice of every ``(inputs, labels)`` batch.

    Every rank reads the same batches (the same seed gives the same shuffle) and keeps its
    ``1/world`` of each along dim 0. Averaging the ranks' gradients then gives the gradient of
    the whole batch, so the run file's batch size and learning rate mean what they mean in a
    single process and the result matches a single-process run up to rounding. Batches
    smaller than the world size are skipped on every rank alike (a rank with no samples
    would have no loss to reduce).
    """
    if ranks.world == 1:
        yield from batches
        return
    for batch in batches:
        x, y = batch[0], batch[1]
        if len(x) < ranks.world:
            continue
        yield (
            torch.tensor_split(x, ranks.world)[ranks.rank],
            torch.tensor_split(y, ranks.world)[ranks.rank],
        )


def _train(
    model: nn.Module,
    train: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    max_batches: int | None,
    log: _Log,
    desc: str,
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
    compressor: Any = None,
    ranks: _Ranks = _SINGLE,
    device: torch.device | None = None,
) -> None:
    """Adam on ``loss_fn(model(x), y)`` with ``compressor`` attached, as a user's loop would.

    The compressor's extra tensors join the optimizer (once: trainable state registered on the
    model is already among its parameters), its terms join the task loss as in the framework
    integrations (:func:`add_compression_loss`) and ``step()`` follows every optimizer step.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    extra = list(compressor.parameters()) if compressor is not None else []
    for p in list(model.parameters()) + extra:
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP averages the model's gradients; a distiller's own parameters (adapters) are
        # averaged by the distiller, which registers its own hooks under torch.distributed.
        forward = DistributedDataParallel(model)
    compressors = [compressor] if compressor is not None else []
    for epoch in range(epochs):
        batches: Iterable[Any] = _shard(_batches(train, max_batches), ranks)
        if device is not None:
            batches = _on(device, batches)
        bar = log.progress(batches, f"{desc} {epoch + 1}/{epochs}", _len(train, max_batches))
        for x, y in bar:
            optimizer.zero_grad()
            task = loss_fn(forward(x), y)
            if not isinstance(task, torch.Tensor) or task.dim() != 0:
                got = tuple(task.shape) if isinstance(task, torch.Tensor) else type(task).__name__
                raise CompressError(
                    f"{desc}: the loss function must return a scalar tensor, got {got}"
                )
            loss = add_compression_loss(task, compressors)
            if not torch.isfinite(loss):
                raise CompressError(f"{desc}: the loss became {loss.item()} (lower lr?)")
            loss.backward()
            optimizer.step()
            if compressor is not None:
                compressor.step()
    # No DDP wrapper outlives the loop: the next step may replace or restructure the model.
    del forward
    model.eval()


def _cache_key(runfile: RunFile, upto: int) -> str:
    data = {
        "model": attrs.asdict(runfile.model),
        "data": attrs.asdict(runfile.data),
        "seed": runfile.seed,
        "loss": runfile.loss,
        "steps": list(runfile.steps[: upto + 1]),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_file(path: str | Path, *, output: str | Path | None = None, quiet: bool = False) -> Path:
    """Load the run file at ``path`` and :func:`run` it; returns the output folder."""
    return run(load_runfile(path), output=output, quiet=quiet)


def run(runfile: RunFile, *, output: str | Path | None = None, quiet: bool = False) -> Path:
    """Run every step of ``runfile`` and write the finished output folder.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), or called inside an initialised process
    group, every rank runs the steps on its slice of each batch (see :func:`_shard`), DDP
    averages the gradients, the plugins reduce their statistics, and only rank 0 evaluates
    and writes; every rank returns the output folder once it is in place.

    :param output: overrides ``runfile.output``.
    :raises ConfigError: the run file does not fit the model (nothing has run yet).
    :raises CompressError: a step failed; no output folder is created or replaced.
    """
    out = Path(output if output is not None else runfile.output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ConfigError(
            f"output folder {out} exists and is not a compress run; refusing to replace it",
            key="output",
        )
    device, backend = select_device(runfile.device)
    ranks, created = _init_distributed(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    try:
        return _run(runfile, out, quiet, ranks, torch.device(device))
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(runfile: RunFile, out: Path, quiet: bool, ranks: _Ranks, device: torch.device) -> Path:
    log = _Log(quiet or not ranks.main)
    torch.manual_seed(runfile.seed)
    model_factory = _resolve(runfile.model.factory, runfile.base_dir, "model.factory")
    data_factory = _resolve(runfile.data.factory, runfile.base_dir, "data.factory")
    evaluate = (
        _resolve(runfile.evaluate, runfile.base_dir, "evaluate") if runfile.evaluate else accuracy
    )
    losses = _resolve_losses(runfile)
    model = model_factory(**runfile.model.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"the factory returned {type(model).__name__}, not an nn.Module", key="model.factory"
        )
    check_against_model(runfile, model)
    model.to(device)
    loaded = data_factory(**runfile.data.kwargs)
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ConfigError("the data factory must return (train, eval)", key="data.factory")
    train, evaluation = loaded
    first = next(iter(evaluation))
    x_eval = first[0] if isinstance(first, (tuple, list)) else first
    x_eval = x_eval.to(device)
    example = (x_eval[:1],)

    if ranks.main:
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    else:
        import tempfile

        # Other ranks still pass a folder to the steps; nothing they put there is kept.
        tmp = Path(tempfile.mkdtemp(prefix="compress-run-rank"))
    try:
        results = _execute(
            runfile, model, train, evaluation, evaluate, example, x_eval, tmp, out, log, ranks,
            losses=losses, device=device,
        )  # fmt: skip
        if ranks.main:
            _write_report(runfile, results, tmp, log)
            _finish(tmp, out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(ranks)
    if not quiet and ranks.main:
        print(_table_markdown(runfile, results["stages"]))
        print(f"\nwritten: {out}")
    return out


def _finish(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _execute(
    runfile: RunFile,
    model: nn.Module,
    train: Iterable[Any],
    evaluation: Iterable[Any],
    evaluate: Callable[..., float],
    example: tuple[Any, ...],
    x_eval: torch.Tensor,
    tmp: Path,
    out: Path,
    log: _Log,
    ranks: _Ranks = _SINGLE,
    *,
    losses: dict[int, Callable[..., torch.Tensor]],
    device: torch.device,
) -> dict[str, Any]:
    import compress_core

    steps = runfile.parsed_steps()
    stages: list[StageResult] = []
    sparsity: dict[str, float] = {}
    teacher: nn.Module | None = None
    quantizer = None
    quant_config: list[dict[str, Any]] | None = None
    quant_method: str | None = None
    onnx_path: Path | None = None
    saved_float = False

    def record(
        name: str,
        started: float,
        *,
        size: tuple[int, str] | None = None,
        ort: OrtModel | None = None,
    ) -> None:
        model.eval()
        if not ranks.main:
            return  # every rank holds the same model: one evaluation is the result
        log.info(f"  evaluating {name}")
        metric = evaluate(
            ort if ort is not None else model,
            _on(device, log.progress(evaluation, f"eval {name}")),
        )
        with torch.no_grad():
            latency = _latency_ms(lambda: model(x_eval), runfile.latency_runs)
            int8 = (
                _latency_ms(lambda: ort(x_eval), runfile.latency_runs) if ort is not None else None
            )
        stage = StageResult(
            name=name,
            metric=float(metric),
            parameters=_parameters(model),
            flops=_flops(model, example),
            latency_ms=latency,
            int8_latency_ms=int8,
            size_bytes=size[0] if size else _float_size(model),
            size_note=size[1] if size else "float32 safetensors",
            seconds=time.perf_counter() - started,
        )
        stages.append(stage)
        log.info(
            f"  {name}: {runfile.metric} {stage.metric:.2f}, {stage.parameters:,} parameters, {stage.size_bytes:,} bytes"
        )

    def save_float() -> None:
        if not ranks.main:
            return
        folder = tmp / "model"
        if "_compress_pruned" in model.__dict__:
            compress_core.save_pruned(model, folder)
        else:
            import safetensors.torch

            folder.mkdir()
            safetensors.torch.save_model(model, str(folder / "model.safetensors"))
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            (folder / "shapes.json").write_text(json.dumps(shapes, indent=1, sort_keys=True))

    def train_for(index: int, desc: str, compressor: Any = None) -> None:
        """Train the current model as step ``index`` says (epochs, lr, batches, loss)."""
        step = steps[index]
        assert not isinstance(step, ExportStep)
        _train(
            model,
            train,
            epochs=step.epochs,
            lr=step.lr if step.lr is not None else DEFAULT_LR,
            max_batches=step.max_batches,
            log=log,
            desc=desc,
            loss_fn=losses[index],
            compressor=compressor,
            ranks=ranks,
            device=device,
        )

    model.eval()
    record("initial", time.perf_counter())
    for i, step in enumerate(steps):
        started = time.perf_counter()
        name = step.name or type(step).__name__[:-4].lower()
        log.info(f"[{i + 1}/{len(steps)}] {name}")
        try:
            if isinstance(step, TrainStep):
                key = _cache_key(runfile, i)
                cache_file = f"cache/step{i}-{key}.safetensors"
                previous = out / cache_file
                if step.cache and previous.is_file():
                    import safetensors.torch

                    safetensors.torch.load_model(model, str(previous))
                    log.info(f"  reusing the cached weights {previous}")
                else:
                    train_for(i, f"train {name}")
                if step.cache and ranks.main:
                    import safetensors.torch

                    (tmp / "cache").mkdir(exist_ok=True)
                    safetensors.torch.save_model(model, str(tmp / cache_file))
            elif isinstance(step, PruneStep):
                if teacher is None:
                    teacher = copy.deepcopy(model).eval()
                config = list(step.config_list)
                if step.auto_dependency:
                    config = compress_core.auto_set_dependency_group_ids(model, config, example)
                pruner = compress_core.create(step.method, model, config, **step.params)
                if step.epochs is not None:
                    train_for(i, f"prune {name}", pruner)
                masks = pruner.compress()
                for module_name, targets in masks.items():
                    mask = targets.get("weight")
                    if mask is not None and mask.dim() >= 2:
                        channels = mask.reshape(mask.shape[0], -1).any(dim=1)
                        sparsity[module_name] = 1.0 - float(channels.float().mean())
                if step.speedup:
                    model = compress_core.speedup(model, masks, example)
                else:
                    compress_core.unwrap(model, bake=True)
            elif isinstance(step, DistillStep):
                if teacher is None:
                    teacher = copy.deepcopy(model).eval()
                distiller = compress_core.create(
                    step.method, model, list(step.config_list), teacher=teacher, **step.params
                )
                try:
                    train_for(i, f"distill {name}", distiller)
                finally:
                    distiller.close()  # type: ignore[attr-defined]  # distillers remove their hook
                compress_core.unwrap(model, bake=False)
            elif isinstance(step, QuantizeStep):
                save_float()
                saved_float = True
                model.eval()
                quant_config = list(step.config_list)
                quant_method = step.method
                quantizer = compress_core.create(step.method, model, quant_config, **step.params)
                if step.epochs is not None:
                    train_for(i, f"quantize {name}", quantizer)
                with torch.no_grad():
                    # Observers see this rank's slice; the quantizer reduces min/max over ranks.
                    for x, _ in log.progress(
                        _on(device, _shard(_batches(train, step.calibration_batches), ranks)),
                        f"calibrate {name}",
                        _len(train, step.calibration_batches),
                    ):
                        model(x)
                quantizer.compress()
                if ranks.main:
                    path = compress_core.save_quantized(
                        model, tmp / "model" / "model.int8.safetensors"
                    )
                    record(name, started, size=(path.stat().st_size, "int8 safetensors"))
                continue
            elif isinstance(step, ExportStep):
                if not ranks.main:
                    continue
                onnx_path = compress_core.export_onnx(
                    model,
                    example,
                    tmp / "model.onnx",
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                )
                record(
                    name,
                    started,
                    size=(onnx_path.stat().st_size, "ONNX file"),
                    ort=OrtModel(onnx_path),
                )
                continue
            record(name, started)
        except ConfigError as exc:
            # Problems that show only on the trained or pruned model still name their step.
            raise ConfigError(str(exc), key=f"steps[{i}]") from None
    if not saved_float:
        save_float()
    return {
        "stages": stages,
        "sparsity": sparsity,
        "quant_config": quant_config,
        "quant_method": quant_method,
        "onnx": onnx_path.name if onnx_path else None,
    }


# -- the report -----------------------------------------------------------------------------

HEADERS = (
    "stage",
    "metric",
    "parameters",
    "FLOPs",
    "latency fp32 (ms)",
    "latency int8 ONNX (ms)",
    "size (bytes)",
    "size vs initial",
    "artifact",
    "time (s)",
)


def _rows(runfile: RunFile, stages: list[StageResult]) -> list[tuple[str, ...]]:
    base = stages[0].size_bytes
    rows: list[tuple[str, ...]] = []
    for s in stages:
        rows.append(
            (
                s.name,
                f"{s.metric:.2f}",
                f"{s.parameters:,}",
                f"{s.flops:,}",
                f"{s.latency_ms:.3f}",
                "-" if s.int8_latency_ms is None else f"{s.int8_latency_ms:.3f}",
                f"{s.size_bytes:,}",
                f"{base / s.size_bytes:.2f}x smaller",
                s.size_note,
                f"{s.seconds:.1f}",
            )
        )
    return rows


def _table_markdown(runfile: RunFile, stages: list[StageResult]) -> str:
    headers = list(HEADERS)
    headers[1] = runfile.metric
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(runfile, stages)]
    return "\n".join(lines)


def _write_report(runfile: RunFile, results: dict[str, Any], tmp: Path, log: _Log) -> None:
    stages: list[StageResult] = results["stages"]
    sparsity: dict[str, float] = results["sparsity"]
    lines = [
        "# compress run report",
        "",
        f"Latency: median of {runfile.latency_runs} forward passes of one evaluation batch "
        f"({torch.get_num_threads()} torch threads); FLOPs: `torch.utils.flop_counter` on one "
        "sample; size: the stage's artifact.",
        "",
        _table_markdown(runfile, stages),
        "",
    ]
    if sparsity:
        lines += ["## Channels pruned per layer", "", "| layer | pruned |", "|---|---|"]
        lines += [f"| {name} | {ratio:.1%} |" for name, ratio in sparsity.items()]
        lines.append("")
    try:
        import matplotlib
    except ImportError:
        lines += [
            "Plots: matplotlib is not installed (`pip install 'compress-core[report]'`), so none were drawn.",
            "",
        ]
    else:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if sparsity:
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.bar(list(sparsity), [100 * v for v in sparsity.values()])
            ax.set_ylabel("channels pruned (%)")
            ax.set_title("Sparsity per layer")
            fig.tight_layout()
            fig.savefig(tmp / "sparsity.png", dpi=100)
            plt.close(fig)
            lines += ["![sparsity per layer](sparsity.png)", ""]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s.size_bytes / 1024 for s in stages], [s.metric for s in stages], "o-")
        for n, s in enumerate(stages):
            # Consecutive stages often share a size (quantize, export): alternate the labels.
            ax.annotate(
                s.name,
                (s.size_bytes / 1024, s.metric),
                textcoords="offset points",
                xytext=(4, 4 if n % 2 == 0 else -12),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel("size (KiB)")
        ax.set_ylabel(runfile.metric)
        ax.set_title("Accuracy against size across stages")
        fig.tight_layout()
        fig.savefig(tmp / "accuracy_size.png", dpi=100)
        plt.close(fig)
        lines += ["![accuracy against size](accuracy_size.png)", ""]
    files = [
        "`model/`: the float model (`model.safetensors` + `pruned.json` or `shapes.json`; load with `compress_core.load_pruned`)"
    ]
    if results["quant_config"] is not None:
        files.append(
            "`model/model.int8.safetensors`: int8 checkpoint (`compress_core.load_quantized` after re-creating the quantizer from `run.json`)"
        )
    if results["onnx"]:
        files.append(
            f"`{results['onnx']}`: the exported model (QDQ int8 when quantized), input `input`, output `output`"
        )
    lines += ["## Files", ""] + [f"- {f}" for f in files] + [""]
    (tmp / "report.md").write_text("\n".join(lines))
    summary = {
        "format": "compress_core.run/1",
        "stages": [attrs.asdict(s) for s in stages],
        "sparsity": sparsity,
        "quantize_config_list": results["quant_config"],
        "quantize_method": results["quant_method"],
        "steps": list(runfile.steps),
    }
    (tmp / MARKER).write_text(json.dumps(summary, indent=1, default=str))
