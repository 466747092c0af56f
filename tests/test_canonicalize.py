"""canonicalize(model, config_list, kind): shorthand, target_settings, defaults and the
configure-once / overwrite rules, for pruning, quantization and distillation.

Pruning defaults come from the built-in pruning plugin (loaded through its entry point).
Quantization and distillation defaults are registered here on a fresh ``PluginHost`` as the
design describes them, so these tests do not depend on which plugins are installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import compress_core
from compress_core import (
    AlignSetting,
    ConfigError,
    ConfigWarning,
    DistillationSetting,
    PluginHost,
    PruningSetting,
    QuantizationSetting,
    TargetRecord,
    canonicalize,
    hookimpl,
)


class MyLinear(nn.Linear):
    pass


class Net(nn.Module):
    """conv (Conv2d) bn (BatchNorm2d) relu (ReLU) fc1 fc2 (Linear) head (Linear, no bias)
    emb (Embedding) sub (MyLinear)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)
        self.head = nn.Linear(2, 2, bias=False)
        self.sub = MyLinear(2, 2)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def two() -> TwoLinear:
    torch.manual_seed(0)
    return TwoLinear()


def keyed(records: list[TargetRecord]) -> dict[tuple[str, str], TargetRecord]:
    return {(r.module_name, r.target_name): r for r in records}


def names(records: list[TargetRecord]) -> list[tuple[str, str]]:
    return [(r.module_name, r.target_name) for r in records]


ALIGNED_BIAS = PruningSetting(align=AlignSetting(target_name="weight", dims=(0,)))


# -- the spec's example ------------------------------------------------------------------------

SHORTHAND = {"op_types": ["Linear"], "sparse_ratio": 0.8}

STANDARD = {
    "op_names": ["fc1", "fc2"],
    "target_names": ["weight", "bias"],
    "target_settings": {
        "weight": {
            "sparse_ratio": 0.8,
            "max_sparse_ratio": None,
            "min_sparse_ratio": None,
            "sparse_threshold": None,
            "global_group_id": None,
            "dependency_group_id": None,
            "granularity": "default",
            "internal_metric_block": None,
            "apply_method": "mul",
        },
        "bias": {
            "align": {"target_name": "weight", "dims": [0]},
            "apply_method": "mul",
        },
    },
}


def test_spec_shorthand_gives_weight_ratio_and_aligned_bias(two):
    records = canonicalize(two, [SHORTHAND], "pruning")
    assert names(records) == [("fc1", "weight"), ("fc1", "bias"), ("fc2", "weight"), ("fc2", "bias")]
    for record in records:
        assert record.kind == "pruning"
        assert record.entry == 0
        assert record.module_type == "Linear"
        if record.target_name == "weight":
            assert record.settings == PruningSetting(sparse_ratio=0.8)
        else:
            # The bias is aligned to the weight's dim 0 and does NOT get sparse_ratio.
            assert record.settings == ALIGNED_BIAS
            assert record.settings.sparse_ratio is None


def test_spec_standard_config_gives_the_same_records(two):
    short = canonicalize(two, [SHORTHAND], "pruning")
    standard = canonicalize(two, [STANDARD], "pruning")
    assert [(r.module_name, r.target_name, r.settings, r.target) for r in short] == [
        (r.module_name, r.target_name, r.settings, r.target) for r in standard
    ]


def test_settings_dict_contains_the_spec_standard_settings(two):
    by_key = keyed(canonicalize(two, [SHORTHAND], "pruning"))
    weight = by_key[("fc1", "weight")].settings_dict()
    assert weight.items() >= STANDARD["target_settings"]["weight"].items()
    assert weight["align"] is None
    bias = by_key[("fc1", "bias")].settings_dict()
    assert bias["align"] == {"module_name": None, "target_name": "weight", "dims": [0]}
    assert bias["apply_method"] == "mul"
    assert bias["sparse_ratio"] is None


# -- default targets per module type (pruning plugin) -----------------------------------------


def test_pruning_defaults_per_type(net):
    records = canonicalize(
        net, [{"op_types": ["Embedding", "Conv2d", "BatchNorm2d", "Linear"], "sparse_ratio": 0.5}], "pruning"
    )
    assert names(records) == [
        ("emb", "weight"),
        ("conv", "weight"),
        ("conv", "bias"),
        ("bn", "weight"),
        ("bn", "bias"),
        ("fc1", "weight"),
        ("fc1", "bias"),
        ("fc2", "weight"),
        ("fc2", "bias"),
        ("head", "weight"),  # bias=False: simply no bias target
    ]
    by_key = keyed(records)
    for module in ("conv", "bn", "fc1"):
        assert by_key[(module, "weight")].settings.sparse_ratio == 0.5
        assert by_key[(module, "bias")].settings == ALIGNED_BIAS


def test_bias_false_module_named_bias_explicitly_is_an_error(net):
    with pytest.raises(ConfigError) as info:
        canonicalize(net, [{"op_names": ["head"], "target_names": ["weight", "bias"], "sparse_ratio": 0.5}], "pruning")
    assert (info.value.entry, info.value.key, info.value.module) == (0, "target_names", "head")
    with pytest.raises(ConfigError) as info:
        canonicalize(net, [{"op_names": ["head"], "target_settings": {"bias": {"apply_method": "add"}}}], "pruning")
    assert (info.value.key, info.value.module) == ("target_settings.bias", "head")


def test_defaults_follow_the_class_hierarchy(net):
    # op_types does not match subclasses, but a selected subclass gets its base's defaults.
    records = canonicalize(net, [{"op_types": ["MyLinear"], "sparse_ratio": 0.3}], "pruning")
    assert names(records) == [("sub", "weight"), ("sub", "bias")]
    assert records[0].module_type == "MyLinear"


def test_module_without_defaults_has_no_targets(net):
    with pytest.warns(ConfigWarning, match=r"config_list\[0\] selects no pruning target"):
        assert canonicalize(net, [{"op_types": ["ReLU"], "sparse_ratio": 0.5}], "pruning") == []


def test_module_without_defaults_with_explicit_targets(net):
    records = canonicalize(net, [{"op_names": ["relu"], "target_names": ["_output_"], "sparse_ratio": 0.5}], "pruning")
    assert names(records) == [("relu", "_output_")]
    assert records[0].settings == PruningSetting(sparse_ratio=0.5)


# -- target_names / target_settings / shorthand -------------------------------------------------


def test_target_names_restrict_the_defaults(two):
    records = canonicalize(two, [{"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": 0.4}], "pruning")
    assert names(records) == [("fc1", "weight"), ("fc2", "weight")]


def test_target_settings_override_shorthand_per_target_key_by_key(two):
    records = keyed(canonicalize(
        two,
        [{"op_types": ["Linear"], "sparse_ratio": 0.8, "granularity": "out_channel",
          "target_settings": {"weight": {"sparse_ratio": 0.5}}}],
        "pruning",
    ))
    assert records[("fc1", "weight")].settings == PruningSetting(sparse_ratio=0.5, granularity="out_channel")
    assert records[("fc2", "weight")].settings == PruningSetting(sparse_ratio=0.5, granularity="out_channel")


def test_target_settings_override_a_default(two):
    records = keyed(canonicalize(
        two, [{"op_names": ["fc1"], "sparse_ratio": 0.2, "target_settings": {"bias": {"apply_method": "add"}}}], "pruning"
    ))
    assert records[("fc1", "bias")].settings == PruningSetting(
        align=AlignSetting(target_name="weight", dims=(0,)), apply_method="add"
    )


def test_target_settings_may_add_targets(two):
    records = canonicalize(
        two,
        [{"op_names": ["fc1"], "sparse_ratio": 0.5,
          "target_settings": {"_output_": {"granularity": "per_channel"}}}],
        "pruning",
    )
    assert names(records) == [("fc1", "weight"), ("fc1", "bias"), ("fc1", "_output_")]
    # A target without defaults receives every shorthand key (spec: shorthand applies to all
    # targets of the entry), then its own target_settings.
    assert keyed(records)[("fc1", "_output_")].settings == PruningSetting(sparse_ratio=0.5, granularity="per_channel")


def test_target_settings_added_target_with_target_names(two):
    records = canonicalize(
        two,
        [{"op_names": ["fc1"], "target_names": ["weight"], "sparse_ratio": 0.5,
          "target_settings": {"_input_": {"sparse_ratio": 0.1}}}],
        "pruning",
    )
    assert names(records) == [("fc1", "weight"), ("fc1", "_input_0")]
    assert keyed(records)[("fc1", "_input_0")].settings.sparse_ratio == 0.1


def test_shorthand_key_applying_to_no_target_is_an_error(two):
    with pytest.raises(ConfigError) as info:
        canonicalize(two, [{"op_types": ["Linear"], "target_names": ["bias"], "sparse_ratio": 0.5}], "pruning")
    assert (info.value.entry, info.value.key) == (0, "sparse_ratio")
    assert "bias" in str(info.value)


def test_shorthand_key_for_the_aligned_bias_only(two):
    # 'align' is a key of the bias defaults only; the weight keeps align=None.
    records = keyed(canonicalize(
        two, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "align": {"target_name": "weight", "dims": [0]}}], "pruning"
    ))
    assert records[("fc1", "weight")].settings.align is None
    assert records[("fc1", "bias")].settings.align == AlignSetting(target_name="weight", dims=(0,))


def test_shorthand_on_an_entry_selecting_nothing_only_warns(two):
    with pytest.warns(ConfigWarning) as caught:
        assert canonicalize(two, [{"op_names": ["ghost"], "sparse_ratio": 0.5}], "pruning") == []
    assert any("ghost" in str(w.message) for w in caught)


def test_records_follow_model_order(two):
    records = canonicalize(
        two,
        [{"op_names": ["fc2"], "target_names": ["weight"], "sparse_ratio": 0.1},
         {"op_names": ["fc1"], "target_names": ["weight"], "sparse_ratio": 0.2}],
        "pruning",
    )
    assert [(r.module_name, r.entry) for r in records] == [("fc1", 1), ("fc2", 0)]


def test_canonicalize_does_not_touch_the_model(two):
    before = {k: v.clone() for k, v in two.state_dict().items()}
    canonicalize(two, [SHORTHAND], "pruning")
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in two.modules())


def test_canonicalize_does_not_mutate_the_config(two):
    import copy

    config = [copy.deepcopy(STANDARD), {"op_names": ["fc1"], "sparse_ratio": 0.3}]
    snapshot = copy.deepcopy(config)
    with pytest.warns(ConfigWarning):
        canonicalize(two, config, "pruning")
    assert config == snapshot


# -- configure-once (pruning, distillation) and overwrite (quantization) -----------------------


def test_pruning_first_entry_wins_with_a_warning_naming_both(two):
    config = [
        {"op_names": ["fc1"], "sparse_ratio": 0.5},
        {"op_types": ["Linear"], "sparse_ratio": 0.9},
    ]
    with pytest.warns(ConfigWarning) as caught:
        records = keyed(canonicalize(two, config, "pruning"))
    assert records[("fc1", "weight")].settings.sparse_ratio == 0.5
    assert records[("fc1", "weight")].entry == 0
    assert records[("fc1", "bias")].entry == 0
    assert records[("fc2", "weight")].settings.sparse_ratio == 0.9
    assert records[("fc2", "weight")].entry == 1
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # fc1.weight and fc1.bias
    for target, text in zip(("fc1.weight", "fc1.bias"), messages):
        assert target in text
        assert "config_list[1]" in text and "config_list[0]" in text


def test_pruning_first_entry_wins_even_if_later_is_more_specific(two):
    config = [
        {"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": 0.1},
        {"op_names": ["fc2"], "target_names": ["weight"], "sparse_threshold": 0.3},
    ]
    with pytest.warns(ConfigWarning, match=r"config_list\[1\].*fc2\.weight.*config_list\[0\]"):
        records = keyed(canonicalize(two, config, "pruning"))
    assert records[("fc2", "weight")].settings == PruningSetting(sparse_ratio=0.1)


def test_distillation_first_entry_wins_with_a_warning(two):
    config = [
        {"op_names": ["fc1"], "target_names": ["_output_"], "lambda": 0.5},
        {"op_names": ["fc1", "fc2"], "target_names": ["_output_"], "lambda": 2, "apply_method": "kl"},
    ]
    with pytest.warns(ConfigWarning, match=r"config_list\[1\].*fc1\._output_.*config_list\[0\]"):
        records = keyed(canonicalize(two, config, "distillation"))
    assert records[("fc1", "_output_")].settings == DistillationSetting(lambda_=0.5)
    assert records[("fc2", "_output_")].settings == DistillationSetting(lambda_=2.0, apply_method="kl")


def test_quantization_later_entry_overwrites_whole_settings(two):
    config = [
        {"op_names": ["fc1"], "target_names": ["weight", "_input_"], "quant_dtype": "int4", "quant_scheme": "affine"},
        {"op_names": ["fc1"], "target_names": ["weight"], "quant_scheme": "symmetric"},
    ]
    with pytest.warns(ConfigWarning) as caught:
        records = keyed(canonicalize(two, config, "quantization"))
    # Whole settings: quant_dtype falls back to the default, not int4 from entry 0.
    assert records[("fc1", "weight")].settings == QuantizationSetting(quant_dtype="int8", quant_scheme="symmetric")
    assert records[("fc1", "weight")].entry == 1
    # Targets the later entry does not name keep the earlier settings.
    assert records[("fc1", "_input_0")].settings == QuantizationSetting(quant_dtype="int4", quant_scheme="affine")
    assert records[("fc1", "_input_0")].entry == 0
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "fc1.weight" in messages[0]
    assert "config_list[1]" in messages[0] and "config_list[0]" in messages[0]


def test_quantization_three_entries_last_wins(two):
    config = [
        {"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int2"},
        {"op_types": ["Linear"], "target_names": ["weight"], "quant_dtype": "int4"},
        {"op_names": ["fc2"], "target_names": ["weight"], "quant_dtype": "uint8"},
    ]
    with pytest.warns(ConfigWarning):
        records = keyed(canonicalize(two, config, "quantization"))
    assert (records[("fc1", "weight")].settings.quant_dtype, records[("fc1", "weight")].entry) == ("int4", 1)
    assert (records[("fc2", "weight")].settings.quant_dtype, records[("fc2", "weight")].entry) == ("uint8", 2)


def test_same_entry_naming_a_target_twice_is_not_configure_twice(two):
    records = canonicalize(two, [{"op_names": ["fc1", "fc1"], "target_names": ["_input_", "_input_0", "_input_input"]}], "quantization")
    assert names(records) == [("fc1", "_input_0")]


def test_entry_selecting_nothing_warns_per_kind(two):
    for kind in ("pruning", "quantization", "distillation"):
        with pytest.warns(ConfigWarning, match=rf"config_list\[0\] selects no {kind} target"):
            assert canonicalize(two, [{"op_types": ["Conv2d"]}], kind) == []


def test_entry_fully_shadowed_by_an_earlier_one_warns(two):
    config = [
        {"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": 0.1},
        {"op_names": ["fc1"], "target_names": ["weight"], "sparse_ratio": 0.2},
    ]
    with pytest.warns(ConfigWarning, match=r"config_list\[1\]"):
        records = canonicalize(two, config, "pruning")
    assert {r.entry for r in records} == {0}


# -- quantization and distillation with registered defaults -----------------------------------

QUANT = {"quant_dtype": "int8", "quant_scheme": None, "granularity": "default"}


class DesignDefaults:
    """The design's quantization and distillation defaults, as a plugin would register them."""

    @hookimpl
    def compress_register_defaults(self, registry):
        registry.add_default_targets(
            "quantization", (nn.Linear, nn.Conv2d), {"_input_": QUANT, "weight": QUANT, "_output_": QUANT}
        )
        registry.add_default_targets("quantization", (nn.ReLU, nn.ReLU6), {"_input_": QUANT, "_output_": QUANT})
        registry.add_default_targets(
            "distillation", (nn.Module,), {"_output_": {"lambda": 1.0, "link": None, "apply_method": "mse"}}
        )


class WeightDtypeOnly:
    """Quantization defaults whose weight settings have quant_dtype only."""

    @hookimpl
    def compress_register_defaults(self, registry):
        registry.add_default_targets("quantization", (nn.Linear,), {"weight": {"quant_dtype": "int8"}})


@pytest.fixture
def host() -> PluginHost:
    host = PluginHost()
    host.register(DesignDefaults(), "design-defaults")
    assert host.plugins["design-defaults"].status == "ok"
    return host


def test_quantization_shorthand_with_defaults(net, host):
    records = canonicalize(net, [{"op_types": ["Linear", "ReLU"], "quant_dtype": "uint8"}], "quantization", host=host)
    assert names(records) == [
        ("relu", "_input_0"),
        ("relu", "_output_"),
        ("fc1", "_input_0"),
        ("fc1", "weight"),
        ("fc1", "_output_"),
        ("fc2", "_input_0"),
        ("fc2", "weight"),
        ("fc2", "_output_"),
        ("head", "_input_0"),
        ("head", "weight"),
        ("head", "_output_"),
    ]
    assert all(r.settings == QuantizationSetting(quant_dtype="uint8") for r in records)
    assert all(r.kind == "quantization" for r in records)


def test_quantization_target_settings_override_and_spelling(net, host):
    records = keyed(canonicalize(
        net,
        [{"op_names": ["fc1"], "quant_scheme": "affine",
          "target_settings": {"_input_0": {"quant_dtype": "uint8"}, "weight": {"granularity": "per_channel"}}}],
        "quantization",
        host=host,
    ))
    assert list(records) == [("fc1", "_input_0"), ("fc1", "weight"), ("fc1", "_output_")]
    # target_settings given as '_input_0' reach the default target '_input_' (the same input).
    assert records[("fc1", "_input_0")].settings == QuantizationSetting(quant_dtype="uint8", quant_scheme="affine")
    assert records[("fc1", "weight")].settings == QuantizationSetting(quant_scheme="affine", granularity="per_channel")
    assert records[("fc1", "_output_")].settings == QuantizationSetting(quant_scheme="affine")


def test_quantization_fuse_names_with_defaults(net, host):
    records = canonicalize(
        net, [{"op_names": ["conv"], "fuse_names": [["conv", "bn", "relu"]]}], "quantization", host=host
    )
    assert names(records) == [("conv", "_input_0"), ("conv", "weight"), ("conv", "_output_")]
    assert all(tuple(map(tuple, r.entry_settings["fuse_names"])) == (("conv", "bn", "relu"),) for r in records)


def test_quantization_overwrite_with_defaults(net, host):
    config = [
        {"op_types": ["Linear"], "quant_dtype": "int4"},
        {"op_names": ["fc2"], "target_names": ["weight"], "quant_dtype": "int8", "quant_scheme": "affine"},
    ]
    with pytest.warns(ConfigWarning, match=r"config_list\[1\].*fc2\.weight.*config_list\[0\]"):
        records = keyed(canonicalize(net, config, "quantization", host=host))
    assert records[("fc2", "weight")].settings == QuantizationSetting(quant_scheme="affine")
    assert records[("fc2", "_input_0")].settings == QuantizationSetting(quant_dtype="int4")


def test_distillation_with_defaults_for_any_module(net, host):
    records = canonicalize(
        net, [{"op_names": ["fc1", "relu"], "lambda": 0.5, "link": ["teacher.fc1", "teacher.fc"]}], "distillation", host=host
    )
    assert names(records) == [("relu", "_output_"), ("fc1", "_output_")]
    for record in records:
        assert record.settings == DistillationSetting(lambda_=0.5, link=("teacher.fc1", "teacher.fc"))
        assert record.settings_dict()["lambda"] == 0.5


def test_distillation_default_plus_added_target(net, host):
    records = canonicalize(
        net, [{"op_names": ["fc2"], "apply_method": "kl", "target_settings": {"_input_": {"lambda": 3}}}],
        "distillation", host=host,
    )
    by_key = keyed(records)
    assert list(by_key) == [("fc2", "_output_"), ("fc2", "_input_0")]
    assert by_key[("fc2", "_output_")].settings == DistillationSetting(apply_method="kl")
    assert by_key[("fc2", "_input_0")].settings == DistillationSetting(lambda_=3.0, apply_method="kl")


def test_shorthand_goes_only_to_defaults_that_have_the_key(net):
    host = PluginHost()
    host.register(WeightDtypeOnly(), "weight-dtype-only")
    records = canonicalize(net, [{"op_names": ["fc1"], "quant_dtype": "int4"}], "quantization", host=host)
    assert [(r.target_name, r.settings.quant_dtype) for r in records] == [("weight", "int4")]
    with pytest.raises(ConfigError) as info:
        canonicalize(net, [{"op_names": ["fc1"], "quant_scheme": "affine"}], "quantization", host=host)
    assert (info.value.entry, info.value.key) == (0, "quant_scheme")


def test_a_fresh_host_has_no_pruning_defaults(two, host):
    with pytest.warns(ConfigWarning, match="selects no pruning target"):
        assert canonicalize(two, [SHORTHAND], "pruning", host=host) == []


def test_setting_cls_subclass_adds_method_keys(two):
    import attrs

    @attrs.frozen(kw_only=True)
    class ScaledPruning(PruningSetting):
        scale: float = 1.0

    records = keyed(canonicalize(
        two,
        [{"op_names": ["fc1"], "target_names": ["weight"], "sparse_ratio": 0.5,
          "target_settings": {"weight": {"scale": 2}}}],
        "pruning", setting_cls=ScaledPruning,
    ))
    assert records[("fc1", "weight")].settings == ScaledPruning(sparse_ratio=0.5, scale=2.0)
    with pytest.raises(ConfigError) as info:
        canonicalize(
            two, [{"op_names": ["fc1"], "target_settings": {"weight": {"scale": "x"}}}],
            "pruning", setting_cls=ScaledPruning,
        )
    assert (info.value.key, info.value.module) == ("target_settings.weight.scale", "fc1")
    with pytest.raises(ConfigError) as info:
        canonicalize(two, [{"op_names": ["fc1"], "target_names": ["weight"], "scale": 2}], "pruning")
    assert info.value.key == "scale"


def test_create_uses_the_canonical_records(two):
    comp = compress_core.create("level", two, [SHORTHAND])
    try:
        assert sorted((r.module_name, r.target_name) for r in comp.records) == sorted(
            names(canonicalize(two, [SHORTHAND], "pruning"))
        )
    finally:
        compress_core.unwrap(two)
