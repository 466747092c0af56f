"""Quantized artefacts: ONNX QDQ run by onnxruntime, and the compact int8 checkpoint.

onnxruntime (CPU) is the independent reference: it must reproduce the simulated model within
one quantization step of the output, from a file whose weights are stored as integers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import compress_core
from compress_core import ExportError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def run_ort(path, *inputs: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)[0]


def initializer_types(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {init.name: init.data_type for init in model.graph.initializer}


class MLP(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def calibrated(
    method: str,
    config: list,
    *,
    seed: int = 0,
    model: nn.Module | None = None,
    x: torch.Tensor | None = None,
):
    torch.manual_seed(seed)
    model = model or MLP()
    x = torch.randn(32, 16) if x is None else x
    comp = compress_core.create(method, model, config)
    with torch.no_grad():
        model(x)
    result = comp.compress()
    return model.eval(), x, result


def test_exported_mlp_runs_in_onnxruntime_within_one_step(tmp_path) -> None:
    config = [
        {"op_types": ["Linear"], "target_settings": {"weight": {"granularity": "per_channel"}}}
    ]
    model, x, result = calibrated("ptq", config)
    with torch.no_grad():
        simulated = model(x).numpy()
    path = compress_core.export_onnx(model, (x,), tmp_path / "mlp.onnx")
    types = initializer_types(path)
    int8 = onnx.TensorProto.INT8
    assert sum(t == int8 for t in types.values()) == 2  # the two weights
    int32 = [n for n, t in types.items() if t == onnx.TensorProto.INT32 and "zero_point" not in n]
    assert len(int32) == 2  # the two biases
    assert onnx.TensorProto.FLOAT not in [types[n] for n in types if "weight" in n]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # Input and output of each Linear; the weights' QuantizeLinear were evaluated into int8.
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") >= 5
    out = run_ort(path, x)
    step = result["fc2"]["_output_"]["scale"].item()
    assert np.abs(out - simulated).max() <= step + 1e-6
    # The model keeps simulating after export (modes and hooks restored).
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), simulated)


def test_weights_are_the_quantized_integers(tmp_path) -> None:
    config = [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": "per_channel"}]
    model, x, result = calibrated("ptq", config)
    path = compress_core.export_onnx(model, (x,), tmp_path / "w.onnx")
    graph = onnx.load(str(path)).graph
    ints = [
        onnx.numpy_helper.to_array(i)
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.INT8
    ]
    assert len(ints) == 1
    scale = result["fc1"]["weight"]["scale"].reshape(-1, 1)
    expected = (
        torch.round(model.fc1.weight.detach() / scale).clamp(-127, 127).to(torch.int8).numpy()
    )
    np.testing.assert_array_equal(ints[0], expected)


def test_file_is_about_a_quarter_of_float(tmp_path) -> None:
    config = [
        {
            "op_types": ["Linear"],
            "granularity": "per_channel",
            "target_settings": {
                "_input_": {"granularity": "default"},
                "_output_": {"granularity": "default"},
            },
        }
    ]
    torch.manual_seed(0)
    model, x, _ = calibrated(
        "ptq", config, model=nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256))
    )
    q_path = compress_core.export_onnx(model, (x,), tmp_path / "q.onnx")
    f_path = compress_core.export_onnx(compress_core.unwrap(model), (x,), tmp_path / "f.onnx")
    assert os.path.getsize(q_path) / os.path.getsize(f_path) < 0.3


def test_fused_conv_bn_relu_exports_folded_graph(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    config = [
        {
            "op_types": ["Conv2d"],
            "target_settings": {"weight": {"granularity": "per_channel"}},
            "fuse_names": [["0", "1", "2"]],
        }
    ]
    model, x, result = calibrated("ptq", config, model=model, x=x)
    with torch.no_grad():
        simulated = model(x).numpy()
    path = compress_core.export_onnx(model, (x,), tmp_path / "conv.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops
    out = run_ort(path, x)
    assert np.abs(out - simulated).max() <= result["3"]["_output_"]["scale"].item() + 1e-6


@pytest.mark.parametrize(
    ("dtype", "scheme"), [("int4", "symmetric"), ("uint8", "affine"), ("uint4", "affine")]
)
def test_low_bit_and_unsigned_export(tmp_path, dtype: str, scheme: str) -> None:
    config = [{"op_types": ["Linear"], "quant_dtype": dtype, "quant_scheme": scheme}]
    model, x, result = calibrated("ptq", config)
    with torch.no_grad():
        simulated = model(x).numpy()
    path = compress_core.export_onnx(model, (x,), tmp_path / "low.onnx")
    expected_type = onnx.TensorProto.INT8 if dtype.startswith("int") else onnx.TensorProto.UINT8
    types = initializer_types(path)
    assert sum(t == expected_type for n, t in types.items() if "zero_point" not in n) >= 2
    graph = onnx.load(str(path)).graph
    for init in graph.initializer:
        if init.data_type == expected_type and init.dims and len(init.dims) == 2:
            values = onnx.numpy_helper.to_array(init)
            qmin, qmax = result["fc1"]["weight"]["qmin"], result["fc1"]["weight"]["qmax"]
            assert values.min() >= qmin and values.max() <= qmax
    out = run_ort(path, x)
    assert np.abs(out - simulated).max() <= result["fc2"]["_output_"]["scale"].item() + 1e-6


def test_block_granularity_cannot_be_exported(tmp_path) -> None:
    config = [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": [4, 4]}]
    model, x, _ = calibrated("ptq", config)
    with pytest.raises(ExportError, match="block granularity"):
        compress_core.export_onnx(model, (x,), tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


def test_qat_and_lsq_models_export(tmp_path) -> None:
    for method in ("qat", "lsq"):
        torch.manual_seed(0)
        model = MLP()
        comp = compress_core.create(method, model, [{"op_types": ["Linear"]}])
        x = torch.randn(32, 16)
        model.train()
        model(x).sum().backward()
        comp.step()
        result = comp.compress()
        model.eval()
        with torch.no_grad():
            simulated = model(x).numpy()
        path = compress_core.export_onnx(model, (x,), tmp_path / f"{method}.onnx")
        out = run_ort(path, x)
        assert np.abs(out - simulated).max() <= result["fc2"]["_output_"]["scale"].item() + 1e-6, (
            method
        )


# -- compact checkpoint -----------------------------------------------------------------------


def test_compact_checkpoint_is_small_and_loads_back(tmp_path) -> None:
    from safetensors.torch import save_file

    config = [
        {
            "op_types": ["Linear"],
            "granularity": "per_channel",
            "target_settings": {
                "_input_": {"granularity": "default"},
                "_output_": {"granularity": "default"},
            },
        }
    ]
    torch.manual_seed(0)
    model, x, _ = calibrated(
        "ptq", config, model=nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512))
    )
    with torch.no_grad():
        simulated = model(x)
    path = compress_core.save_quantized(model, tmp_path / "q.safetensors")
    float_path = tmp_path / "f.safetensors"
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512))
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(float_path))
    ratio = os.path.getsize(path) / os.path.getsize(float_path)
    assert 0.25 <= ratio <= 0.27
    # A fresh model with other weights, wrapped the same way, becomes the quantized model.
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512))
    comp = compress_core.create("ptq", fresh, config)
    with torch.no_grad():
        fresh(torch.randn(4, 16))
    comp.compress()
    compress_core.load_quantized(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), simulated, atol=1e-6, rtol=0)


def test_compact_checkpoint_of_a_fused_model(tmp_path) -> None:
    torch.manual_seed(0)

    def build() -> nn.Module:
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        with torch.no_grad():
            m[1].running_var.uniform_(0.5, 2.0)
            m[1].weight.uniform_(0.5, 1.5)
        return m.eval()

    config = [
        {
            "op_names": ["0"],
            "granularity": "per_channel",
            "target_settings": {
                "_input_": {"granularity": "default"},
                "_output_": {"granularity": "default"},
            },
            "fuse_names": [["0", "1", "2"]],
        }
    ]
    x = torch.randn(2, 3, 6, 6)
    model, x, _ = calibrated("ptq", config, model=build(), x=x)
    with torch.no_grad():
        simulated = model(x)
    path = compress_core.save_quantized(model, tmp_path / "c.safetensors")
    fresh = build()
    comp = compress_core.create("ptq", fresh, config)
    with torch.no_grad():
        fresh(x)
    comp.compress()
    compress_core.load_quantized(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), simulated, atol=1e-6, rtol=0)


def test_docs_example_runs(tmp_path, monkeypatch) -> None:
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "quantization.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(blocks[0], namespace)
    weight = namespace["params"]["0"]["weight"]
    assert (weight["qmin"], weight["qmax"], weight["scale"].shape) == (-127, 127, (32,))
    x = torch.randn(1, 16)  # exported with a batch of 1 (no dynamic axes)
    with torch.no_grad():
        simulated = namespace["model"](x).numpy()
    out = run_ort(tmp_path / "model.onnx", x)
    assert (
        np.abs(out - simulated).max() <= namespace["params"]["2"]["_output_"]["scale"].item() + 1e-6
    )
    assert (tmp_path / "model.safetensors").exists()


# -- integer kernels: Linear on sequences, quantized embeddings (issue #7) --------------------


def ort_optimized_ops(path, tmp_path) -> list[str]:
    """The op types onnxruntime actually runs, after its graph optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # EXTENDED holds the QDQ fusions; ALL adds only hardware-specific layout changes.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


SEQUENCE_LINEAR = [
    {
        "op_types": ["Linear"],
        "target_names": ["_input_", "weight"],
        "target_settings": {
            "weight": {"granularity": "per_channel"},
            "_input_": {"quant_scheme": "affine"},
        },
    }
]


def test_linear_on_sequences_runs_as_an_integer_matmul(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16) * 2 + 0.5  # affine: the zero point is not 0
    model, x, result = calibrated(
        "ptq", SEQUENCE_LINEAR, model=nn.Sequential(nn.Linear(16, 32)), x=x
    )
    with torch.no_grad():
        simulated = model(x).numpy()
    path = compress_core.export_onnx(model, (x,), tmp_path / "seq.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Transpose" not in ops and "MatMul" not in ops and ops.count("MatMulInteger") == 1
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    matmul = graph.node[ops.index("MatMulInteger")]
    wq = inits[matmul.input[1]]
    w_scale = result["0"]["weight"]["scale"].numpy().astype(np.float64)
    w = model[0].weight.detach().numpy().astype(np.float64)
    # Stored as [in, out] int8: the transposed integers of round(W / s) per output row.
    assert wq.dtype == np.int8 and wq.shape == (16, 32)
    np.testing.assert_array_equal(wq, np.clip(np.rint(w / w_scale[:, None]), -127, 127).T)
    assert not any(v.dtype == np.float32 and v.size >= 16 * 32 for v in inits.values())
    x_scale = np.float32(result["0"]["_input_0"]["scale"].item())
    x_zero = int(result["0"]["_input_0"]["zero_point"].item())
    assert x_zero != 0
    # The int8 input runs as uint8 (x86's fast integer kernels): the zero point moves by 128.
    x_zero_stored = inits[matmul.input[2]]
    assert x_zero_stored.dtype == np.uint8 and int(x_zero_stored) == x_zero + 128
    # onnxruntime fuses the chain (bias included) into its integer kernel.
    optimized = ort_optimized_ops(path, tmp_path)
    assert optimized.count("MatMulIntegerToFloat") == 1
    assert not {"MatMul", "Gemm", "MatMulInteger", "Add"} & set(optimized)
    out = run_ort(path, x)
    # Reference: the integers QuantizeLinear computes (float32 division, half-to-even), their
    # exact int32 products, rescaled by s_x * s_w in float64.
    xq = np.clip(np.rint(x.numpy() / x_scale) + x_zero, -128, 127).astype(np.int64)
    acc = (xq - x_zero) @ wq.astype(np.int64)
    bias = model[0].bias.detach().numpy().astype(np.float64)
    reference = acc * (float(x_scale) * w_scale) + bias
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5)
    # The simulation computes the same numbers in float32: within far less than one step
    # of the output (s_x * s_w, the value of one unit of the accumulator).
    assert np.abs(out - simulated).max() <= float(x_scale) * w_scale.min()


def test_linear_with_float_input_keeps_a_float_matmul_on_int8_weights(tmp_path) -> None:
    config = [{"op_types": ["Linear"], "target_names": ["weight"], "granularity": "per_channel"}]
    x = torch.randn(4, 6, 16)
    model, x, _ = calibrated("ptq", config, model=nn.Sequential(nn.Linear(16, 32)), x=x)
    with torch.no_grad():
        simulated = model(x).numpy()
    path = compress_core.export_onnx(model, (x,), tmp_path / "w.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMul" in ops and "MatMulInteger" not in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    assert [v.shape for v in inits.values() if v.dtype == np.int8 and v.ndim == 2] == [(32, 16)]
    # The file computes the simulation: float arithmetic on the dequantized weight. (With its
    # optimizations on, onnxruntime runs this as MatMulNBits, which also quantizes the float
    # input on the fly: a documented difference, not the file's.)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, simulated, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
def test_embedding_exports_int8_rows_with_per_row_scales(tmp_path, scheme: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 12))
    config = [
        {
            "op_types": ["Embedding"],
            "target_names": ["weight"],
            "granularity": "per_channel",
            "quant_scheme": scheme,
        }
    ]
    ids = torch.randint(0, 100, (3, 7))
    model, _, result = calibrated("ptq", config, model=model, x=ids)
    params = result["0"]["weight"]
    # per_channel on a parameter is dim 0: for an Embedding, one scale per token (row).
    assert params["scale"].shape == (100,)
    with torch.no_grad():
        simulated = model(ids).numpy()
    path = compress_core.export_onnx(model, (ids,), tmp_path / "emb.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    tables = [v for v in inits.values() if v.shape == (100, 12)]
    assert len(tables) == 1 and tables[0].dtype == np.int8
    table = tables[0].astype(np.int64)
    w = model[0].weight.detach().numpy().astype(np.float64)
    scale = params["scale"].numpy().astype(np.float64)[:, None]
    zero = params["zero_point"].numpy().astype(np.int64)[:, None]
    assert (scheme == "affine") == bool(np.any(zero != 0))
    np.testing.assert_array_equal(table, np.clip(np.rint(w / scale) + zero, -127, 127))
    ops = [n.op_type for n in graph.node]
    assert "DequantizeLinear" not in ops and ops.count("Gather") >= 2  # rows, then their scales
    out = run_ort(path, ids)
    # Dequantizing the gathered rows is the simulation's gather of the dequantized table.
    np.testing.assert_array_equal(out, simulated)
    reference = (table[ids.numpy()] - zero[ids.numpy()]) * scale[ids.numpy()]
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=0)


def test_embedding_checkpoint_stores_int8_rows(tmp_path) -> None:
    from safetensors import safe_open

    config = [{"op_types": ["Embedding"], "target_names": ["weight"], "granularity": "per_channel"}]

    def build() -> nn.Module:
        return nn.Sequential(nn.Embedding(1000, 64))

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 9))
    model, _, _ = calibrated("ptq", config, model=build(), x=ids)
    with torch.no_grad():
        simulated = model(ids)
    path = compress_core.save_quantized(model, tmp_path / "emb.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("0.weight").dtype == torch.int8
    # int8 rows plus one float scale and one int8 zero point per row: (64 + 5) / (64 * 4).
    assert os.path.getsize(path) / (1000 * 64 * 4) < 0.28
    torch.manual_seed(1)
    fresh = build()
    comp = compress_core.create("ptq", fresh, config)
    fresh(ids)
    comp.compress()
    compress_core.load_quantized(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), simulated, atol=0, rtol=0)
