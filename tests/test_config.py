"""The config language: keys, types, values and the errors that name them.

Expected values come from the spec (``compression-config-spec.rst``) and ``design.md``, not from
the implementation: every ``ConfigError`` must carry the entry index, the dotted key path as the
user wrote it and, when known, the module, and read like
``config_list[1].target_settings.weight.sparse_ratio: must be within [0, 1], got 1.5``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import compress_core
from compress_core import (
    AlignSetting,
    CompressError,
    ConfigError,
    ConfigWarning,
    DistillationSetting,
    PruningSetting,
    QuantizationSetting,
    canonicalize,
)


class TwoLinear(nn.Module):
    """fc1: Linear(4, 3), fc2: Linear(3, 2), bn: BatchNorm1d(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc2(self.fc1(x)))


@pytest.fixture
def model() -> TwoLinear:
    torch.manual_seed(0)
    return TwoLinear()


def config_error(model: nn.Module, config_list, kind: str = "pruning") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        canonicalize(model, config_list, kind)
    return info.value


def records_of(model: nn.Module, config_list, kind: str = "pruning"):
    return {(r.module_name, r.target_name): r for r in canonicalize(model, config_list, kind)}


# -- ConfigError itself --------------------------------------------------------------------


def test_config_error_is_a_compress_error_and_a_value_error():
    assert issubclass(ConfigError, CompressError)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        (dict(entry=1, key="target_settings.weight.sparse_ratio"),
         "config_list[1].target_settings.weight.sparse_ratio: boom"),
        (dict(entry=0, key="op_names", module="fc1"), "config_list[0].op_names (module 'fc1'): boom"),
        (dict(entry=2), "config_list[2]: boom"),
        (dict(key="pruner"), "pruner: boom"),
        (dict(), "config_list: boom"),
    ],
)
def test_config_error_text_and_attributes(kwargs, text):
    err = ConfigError("boom", **kwargs)
    assert str(err) == text
    assert err.reason == "boom"
    assert err.entry == kwargs.get("entry")
    assert err.key == kwargs.get("key")
    assert err.module == kwargs.get("module")


def test_error_names_entry_key_and_module_like_the_design_example(model):
    err = config_error(
        model,
        [
            {"op_names": ["fc2"], "sparse_ratio": 0.5},
            {"op_names": ["fc1"], "target_settings": {"weight": {"sparse_ratio": 1.5}}},
        ],
    )
    assert err.entry == 1
    assert err.key == "target_settings.weight.sparse_ratio"
    assert err.module == "fc1"
    assert err.reason == "must be within [0, 1], got 1.5"
    text = str(err)
    assert text.startswith("config_list[1].target_settings.weight.sparse_ratio")
    assert text.endswith(": must be within [0, 1], got 1.5")


def test_shorthand_error_points_at_the_top_level_key(model):
    err = config_error(model, [{"op_types": ["Linear"], "sparse_ratio": 1.5}])
    assert (err.entry, err.key) == (0, "sparse_ratio")
    assert err.module in ("fc1", "fc2")
    assert str(err).startswith("config_list[0].sparse_ratio")
    assert "1.5" in str(err)


# -- the config list and entries themselves ------------------------------------------------


@pytest.mark.parametrize("config_list", [{"op_types": ["Linear"]}, "op_types", b"x", 5, None])
def test_config_list_must_be_a_list_of_dicts(model, config_list):
    err = config_error(model, config_list)
    assert err.entry is None
    assert "list" in str(err)


@pytest.mark.parametrize("entry", ["fc1", ["fc1"], 3, None])
def test_each_entry_must_be_a_dict(model, entry):
    err = config_error(model, [{"op_types": ["Linear"], "sparse_ratio": 0.1}, entry])
    assert err.entry == 1
    assert "dict" in str(err)


def test_entry_keys_must_be_strings(model):
    err = config_error(model, [{"op_types": ["Linear"], 1: 0.5}])
    assert err.entry == 0


def test_unknown_kind_is_a_config_error(model):
    with pytest.raises(ConfigError, match="kind"):
        canonicalize(model, [{"op_types": ["Linear"]}], "sparsification")


@pytest.mark.parametrize(
    "entry",
    [
        {},
        {"sparse_ratio": 0.5},
        {"exclude_op_names": ["fc1"]},
        {"exclude_op_names_re": ["fc"]},
        {"exclude_op_types": ["Linear"]},
        {"target_names": ["weight"], "target_settings": {"weight": {"sparse_ratio": 0.5}}},
    ],
)
def test_entry_without_selector_is_an_error(model, entry):
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.1}, entry])
    assert err.entry == 1
    assert "op_names" in str(err) and "op_types" in str(err)


# -- strict types of the common keys -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("op_names", "fc1"),
        ("op_names", ["fc1", 2]),
        ("op_names", {"fc1": 1}),
        ("op_names_re", "fc"),
        ("op_names_re", [None]),
        ("op_types", "Linear"),
        ("op_types", [nn.Linear]),
        ("exclude_op_names", "fc1"),
        ("exclude_op_names_re", "fc"),
        ("exclude_op_types", "Linear"),
        ("target_names", "weight"),
        ("target_names", [1]),
        ("target_settings", "weight"),
        ("target_settings", ["weight"]),
    ],
)
def test_common_keys_are_typed_strictly(model, key, value):
    entry = {"op_types": ["Linear"], key: value}
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.1}, entry])
    assert err.entry == 1
    assert err.key == key
    assert str(err).startswith(f"config_list[1].{key}")


def test_string_op_names_is_not_split_into_characters(model):
    err = config_error(model, [{"op_names": "fc1"}])
    assert err.reason == "must be a list, got str 'fc1'"


def test_tuples_are_accepted_as_lists(model):
    recs = records_of(model, [{"op_names": ("fc1",), "target_names": ("weight",), "sparse_ratio": 0.5}])
    assert list(recs) == [("fc1", "weight")]


def test_target_settings_value_must_be_a_mapping(model):
    err = config_error(model, [{"op_names": ["fc1"], "target_settings": {"weight": 0.5}}])
    assert (err.entry, err.key) == (0, "target_settings.weight")


def test_target_settings_keys_must_be_strings(model):
    err = config_error(model, [{"op_names": ["fc1"], "target_settings": {"weight": {1: 0.5, "x": 2}}}])
    assert err.entry == 0
    assert err.key.startswith("target_settings.weight")


# -- unknown keys ---------------------------------------------------------------------------


def test_unknown_shorthand_key_suggests_the_closest(model):
    err = config_error(model, [{"op_types": ["Linear"], "sparse_ratoi": 0.5}])
    assert (err.entry, err.key) == (0, "sparse_ratoi")
    assert "did you mean 'sparse_ratio'" in str(err)


def test_unknown_common_key_misspelling_suggests_the_common_key(model):
    err = config_error(model, [{"op_types": ["Linear"], "op_name": ["fc1"]}])
    assert err.key == "op_name"
    assert "did you mean 'op_names'" in str(err)


def test_unknown_key_without_close_match_has_no_hint(model):
    err = config_error(model, [{"op_types": ["Linear"], "zzzzqqqq": 1}])
    assert err.key == "zzzzqqqq"
    assert "did you mean" not in str(err)


def test_unknown_key_inside_target_settings_names_its_path(model):
    err = config_error(
        model, [{"op_names": ["fc1"], "target_settings": {"weight": {"sparse_ratoi": 0.5}}}]
    )
    assert err.entry == 0
    assert err.module == "fc1"
    assert err.key == "target_settings.weight.sparse_ratoi"
    assert str(err).startswith("config_list[0].target_settings.weight.sparse_ratoi")
    assert "did you mean 'sparse_ratio'" in str(err)


def test_unknown_key_inside_align_suggests_the_align_key(model):
    err = config_error(
        model,
        [{"op_names": ["fc1"], "target_settings": {"bias": {"align": {"target_name": "weight", "dim": [0]}}}}],
    )
    assert err.key.startswith("target_settings.bias.align")
    assert "dim" in str(err)


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("pruning", "quant_dtype"),
        ("pruning", "lambda"),
        ("pruning", "fuse_names"),
        ("quantization", "sparse_ratio"),
        ("quantization", "link"),
        ("distillation", "sparse_ratio"),
        ("distillation", "quant_scheme"),
    ],
)
def test_keys_of_another_kind_are_unknown(model, kind, key):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["weight"], key: None}], kind)
    assert (err.entry, err.key) == (0, key)
    assert "unknown key" in str(err)


# -- pruning settings -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sparse_ratio", "max_sparse_ratio", "min_sparse_ratio"])
@pytest.mark.parametrize("value", [-0.01, 1.0001, 2, -1, float("nan"), float("inf")])
def test_ratios_must_be_within_unit_interval(model, key, value):
    err = config_error(model, [{"op_names": ["fc1"], key: value}])
    assert (err.entry, err.key, err.module) == (0, key, "fc1")
    assert "must be within [0, 1]" in str(err)


@pytest.mark.parametrize("key", ["sparse_ratio", "max_sparse_ratio", "min_sparse_ratio", "sparse_threshold"])
@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], {"v": 0.5}])
def test_ratio_and_threshold_reject_bool_str_and_containers(model, key, value):
    err = config_error(model, [{"op_names": ["fc1"], key: value}])
    assert (err.entry, err.key) == (0, key)
    assert "must be a number" in str(err)


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (1, 1.0), (0.0, 0.0), (1.0, 1.0), (0.25, 0.25)])
def test_ratio_bounds_are_inclusive_and_ints_are_numbers(model, value, expected):
    recs = records_of(model, [{"op_names": ["fc1"], "sparse_ratio": value}])
    ratio = recs[("fc1", "weight")].settings.sparse_ratio
    assert ratio == expected and isinstance(ratio, float)


def test_min_above_max_is_an_error(model):
    err = config_error(model, [{"op_names": ["fc1"], "min_sparse_ratio": 0.6, "max_sparse_ratio": 0.5}])
    assert (err.entry, err.module) == (0, "fc1")
    assert err.key in ("min_sparse_ratio", "max_sparse_ratio")
    assert "0.6" in str(err) and "0.5" in str(err)


def test_min_equal_max_is_fine(model):
    recs = records_of(
        model, [{"op_names": ["fc1"], "sparse_threshold": 0.1, "min_sparse_ratio": 0.5, "max_sparse_ratio": 0.5}]
    )
    settings = recs[("fc1", "weight")].settings
    assert settings.min_sparse_ratio == settings.max_sparse_ratio == 0.5


def test_min_above_max_across_shorthand_and_target_settings(model):
    err = config_error(
        model,
        [{"op_names": ["fc1"], "max_sparse_ratio": 0.3,
          "target_settings": {"weight": {"min_sparse_ratio": 0.4}}}],
    )
    assert err.entry == 0
    assert err.key in ("target_settings.weight.min_sparse_ratio", "max_sparse_ratio")


def test_ratio_and_threshold_together_is_an_error(model):
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "sparse_threshold": 0.1}])
    assert err.entry == 0 and err.module == "fc1"
    assert err.key in ("sparse_ratio", "sparse_threshold")
    assert "sparse_ratio" in err.reason and "sparse_threshold" in err.reason


@pytest.mark.parametrize("extra", [{"sparse_ratio": 0.5}, {"sparse_threshold": 0.5}])
def test_align_together_with_ratio_or_threshold_is_an_error(model, extra):
    err = config_error(
        model,
        [{"op_names": ["fc1"], "target_names": ["bias"],
          "target_settings": {"bias": {**extra}}}],
    )
    # The default bias of Linear is aligned to the weight (spec's standard_config).
    assert (err.entry, err.module) == (0, "fc1")
    assert err.key.startswith("target_settings.bias")
    assert "align" in str(err)


@pytest.mark.parametrize("extra", [{}, {"sparse_threshold": 0.2}])
def test_global_group_needs_sparse_ratio(model, extra):
    err = config_error(model, [{"op_names": ["fc1"], "global_group_id": "g", **extra}])
    assert err.entry == 0 and err.module == "fc1"
    assert "sparse_ratio" in str(err)


@pytest.mark.parametrize("key", ["global_group_id", "dependency_group_id"])
@pytest.mark.parametrize("value", ["group", 0, 7])
def test_group_ids_are_str_or_int(model, key, value):
    recs = records_of(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, key: value}])
    assert getattr(recs[("fc1", "weight")].settings, key) == value


@pytest.mark.parametrize("key", ["global_group_id", "dependency_group_id"])
@pytest.mark.parametrize("value", [True, 1.5, ["g"], {"g": 1}])
def test_group_ids_reject_other_types(model, key, value):
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, key: value}])
    assert (err.entry, err.key) == (0, key)


@pytest.mark.parametrize(
    "value", ["default", "in_channel", "out_channel", "per_channel", [2, 2], (1, -1), [4]]
)
def test_pruning_granularity_accepts_names_and_int_lists(model, value):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["weight"], "sparse_ratio": 0.5, "granularity": value}])
    got = recs[("fc1", "weight")].settings.granularity
    assert got == (tuple(value) if isinstance(value, (list, tuple)) else value)


@pytest.mark.parametrize("value", ["bogus", "channel", "OUT_CHANNEL", [], [1.5], [True, 2], ["1"], 4, None])
def test_pruning_granularity_rejects_other_values(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "granularity": value}])
    assert (err.entry, err.key, err.module) == (0, "granularity", "fc1")


@pytest.mark.parametrize("value", ["mul", "add"])
def test_pruning_apply_method(model, value):
    recs = records_of(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "apply_method": value}])
    assert recs[("fc1", "weight")].settings.apply_method == value
    assert recs[("fc1", "bias")].settings.apply_method == value


@pytest.mark.parametrize("value", ["mse", "kl", "MUL", "sub", 1, None])
def test_pruning_apply_method_rejects_others(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "apply_method": value}])
    assert (err.entry, err.key) == (0, "apply_method")


@pytest.mark.parametrize("value", [1, 4])
def test_internal_metric_block_positive_int(model, value):
    recs = records_of(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "internal_metric_block": value}])
    assert recs[("fc1", "weight")].settings.internal_metric_block == value


@pytest.mark.parametrize("value", [0, -2, 1.5, 2.0, True, "2"])
def test_internal_metric_block_rejects_others(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "sparse_ratio": 0.5, "internal_metric_block": value}])
    assert (err.entry, err.key) == (0, "internal_metric_block")


def test_pruning_defaults_are_the_spec_defaults():
    s = PruningSetting()
    assert (s.sparse_ratio, s.max_sparse_ratio, s.min_sparse_ratio, s.sparse_threshold) == (None,) * 4
    assert (s.global_group_id, s.dependency_group_id, s.internal_metric_block, s.align) == (None,) * 4
    assert s.granularity == "default"
    assert s.apply_method == "mul"


# -- align ----------------------------------------------------------------------------------


def test_align_structures_into_align_setting(model):
    recs = records_of(
        model,
        [{"op_names": ["bn"], "target_names": ["weight"],
          "target_settings": {"weight": {"align": {"module_name": "fc2", "target_name": "weight", "dims": [0]}}}}],
    )
    assert recs[("bn", "weight")].settings.align == AlignSetting(module_name="fc2", target_name="weight", dims=(0,))


@pytest.mark.parametrize(
    ("align", "key_suffix"),
    [
        ({"target_name": "weight"}, "dims"),
        ({"dims": [0]}, "target_name"),
        ({"target_name": "weight", "dims": "0"}, "dims"),
        ({"target_name": "weight", "dims": [0.5]}, "dims"),
        ({"target_name": 3, "dims": [0]}, "target_name"),
        ({"module_name": ["fc1"], "target_name": "weight", "dims": [0]}, "module_name"),
    ],
)
def test_align_errors_name_the_align_key(model, align, key_suffix):
    err = config_error(model, [{"op_names": ["fc1"], "target_settings": {"bias": {"align": align}}}])
    assert err.entry == 0 and err.module == "fc1"
    assert err.key == f"target_settings.bias.align.{key_suffix}"


def test_align_must_be_a_mapping(model):
    err = config_error(model, [{"op_names": ["fc1"], "target_settings": {"bias": {"align": "weight"}}}])
    assert err.key == "target_settings.bias.align"


# -- quantization settings -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [f"{sign}int{bits}" for sign in ("", "u") for bits in range(1, 9)])
def test_quant_dtype_int_and_uint_with_bits(model, dtype):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": dtype}], "quantization")
    assert recs[("fc1", "weight")].settings.quant_dtype == dtype


@pytest.mark.parametrize("dtype", ["int9", "int0", "int16", "uint32", "int", "float8", "INT8", " int8", "int8 ", "sint8", 8, None])
def test_quant_dtype_rejects_other_values(model, dtype):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": dtype}], "quantization")
    assert (err.entry, err.key, err.module) == (0, "quant_dtype", "fc1")


def test_quant_defaults():
    s = QuantizationSetting()
    assert s.quant_dtype == "int8"
    assert s.quant_scheme is None
    assert s.granularity == "default"


@pytest.mark.parametrize("scheme", ["affine", "symmetric", None])
def test_quant_scheme(model, scheme):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["weight"], "quant_scheme": scheme}], "quantization")
    assert recs[("fc1", "weight")].settings.quant_scheme == scheme


@pytest.mark.parametrize("scheme", ["asymmetric", "Affine", "sym", 1, True])
def test_quant_scheme_rejects_others(model, scheme):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["weight"], "quant_scheme": scheme}], "quantization")
    assert (err.entry, err.key) == (0, "quant_scheme")


@pytest.mark.parametrize("value", ["default", "per_channel", [1, 4], [-1]])
def test_quant_granularity(model, value):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": value}], "quantization")
    assert recs[("fc1", "weight")].settings.granularity == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize("value", ["out_channel", "in_channel", "per_tensor", [], [0.5]])
def test_quant_granularity_rejects_others(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": value}], "quantization")
    assert (err.entry, err.key) == (0, "granularity")


def test_quant_target_settings_error_path(model):
    err = config_error(
        model,
        [{"op_names": ["fc1"], "target_names": ["weight"]},
         {"op_names": ["fc2"], "target_names": ["weight"], "target_settings": {"weight": {"quant_dtype": "int12"}}}],
        "quantization",
    )
    assert (err.entry, err.key, err.module) == (1, "target_settings.weight.quant_dtype", "fc2")
    assert str(err).startswith("config_list[1].target_settings.weight.quant_dtype")


# -- fuse_names (quantization, entry level) -----------------------------------------------


def test_fuse_names_valid(model):
    recs = canonicalize(
        model,
        [{"op_names": ["fc2"], "target_names": ["weight"], "fuse_names": [["fc2", "bn"]]}],
        "quantization",
    )
    assert [(r.module_name, r.target_name) for r in recs] == [("fc2", "weight")]
    assert tuple(tuple(g) for g in recs[0].entry_settings["fuse_names"]) == (("fc2", "bn"),)


def test_fuse_names_first_selected_by_op_names_re(model):
    canonicalize(
        model,
        [{"op_names_re": ["fc2$"], "target_names": ["weight"], "fuse_names": [("fc2", "bn")]}],
        "quantization",
    )


@pytest.mark.parametrize(
    ("fuse_names", "key"),
    [
        ("fc2", "fuse_names"),
        (["fc2", "bn"], "fuse_names"),
        ([["fc2", 3]], "fuse_names"),
        ([["fc2"]], "fuse_names[0]"),
        ([["fc2", "bn"], ["fc2", "nope"]], "fuse_names[1]"),
        ([["fc1", "bn"]], "fuse_names[0]"),
        ([["bn", "fc2"]], "fuse_names[0]"),
        ([["ghost", "bn"]], "fuse_names[0]"),
    ],
)
def test_fuse_names_errors(model, fuse_names, key):
    err = config_error(
        model,
        [{"op_names": ["fc1"], "target_names": ["weight"]},
         {"op_names": ["fc2"], "target_names": ["weight"], "fuse_names": fuse_names}],
        "quantization",
    )
    assert err.entry == 1
    assert err.key == key, str(err)


def test_fuse_names_unknown_module_names_closest(model):
    err = config_error(
        model, [{"op_names": ["fc2"], "target_names": ["weight"], "fuse_names": [["fc2", "bnn"]]}], "quantization"
    )
    assert "'bnn'" in str(err)
    assert "'bn'" in str(err)


def test_fuse_names_first_must_be_selected(model):
    err = config_error(
        model, [{"op_names": ["fc2"], "target_names": ["weight"], "fuse_names": [["fc1", "bn"]]}], "quantization"
    )
    assert "fc1" in str(err)


# -- distillation settings -----------------------------------------------------------------


def test_distillation_defaults():
    s = DistillationSetting()
    assert s.lambda_ == 1.0
    assert s.link is None
    assert s.apply_method == "mse"


@pytest.mark.parametrize(("value", "expected"), [(2, 2.0), (0.5, 0.5), (0, 0.0)])
def test_lambda_int_or_float(model, value, expected):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "lambda": value}], "distillation")
    record = recs[("fc1", "_output_")]
    assert record.settings.lambda_ == expected
    assert isinstance(record.settings.lambda_, float)
    assert record.settings_dict()["lambda"] == expected
    assert "lambda_" not in record.settings_dict()


def test_lambda_in_target_settings(model):
    recs = records_of(
        model,
        [{"op_names": ["fc1"], "target_names": ["_output_"], "target_settings": {"_output_": {"lambda": 3}}}],
        "distillation",
    )
    assert recs[("fc1", "_output_")].settings.lambda_ == 3.0


@pytest.mark.parametrize("value", [True, "1.0", [1.0], None])
def test_lambda_rejects_other_types_and_names_key_lambda(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "lambda": value}], "distillation")
    assert (err.entry, err.key, err.module) == (0, "lambda", "fc1")
    assert str(err).startswith("config_list[0].lambda")


def test_lambda_error_in_target_settings_names_key_lambda(model):
    err = config_error(
        model,
        [{"op_names": ["fc1"], "target_names": ["_output_"], "target_settings": {"_output_": {"lambda": "x"}}}],
        "distillation",
    )
    assert err.key == "target_settings._output_.lambda"


def test_lambda_underscore_is_not_a_config_key(model):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "lambda_": 1.0}], "distillation")
    assert err.key == "lambda_"
    assert "did you mean 'lambda'" in str(err)


@pytest.mark.parametrize(("value", "expected"), [("teacher.fc1", "teacher.fc1"), (["a", "b"], ("a", "b")), (("a",), ("a",))])
def test_link_str_or_list(model, value, expected):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "link": value}], "distillation")
    assert recs[("fc1", "_output_")].settings.link == expected


@pytest.mark.parametrize("value", [[], [1], ["a", None], 5, {"a": 1}, True])
def test_link_rejects_others(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "link": value}], "distillation")
    assert (err.entry, err.key) == (0, "link")


@pytest.mark.parametrize("value", ["mse", "kl"])
def test_distillation_apply_method(model, value):
    recs = records_of(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "apply_method": value}], "distillation")
    assert recs[("fc1", "_output_")].settings.apply_method == value


@pytest.mark.parametrize("value", ["mul", "add", "KL", "l2", 0])
def test_distillation_apply_method_rejects_others(model, value):
    err = config_error(model, [{"op_names": ["fc1"], "target_names": ["_output_"], "apply_method": value}], "distillation")
    assert (err.entry, err.key) == (0, "apply_method")


# -- validation happens before anything is touched -----------------------------------------


def test_invalid_config_does_not_touch_the_model(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        compress_core.create("level", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5},
                                              {"op_names": ["fc2"], "sparse_ratio": "high"}])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_later_entry_error_is_reported_even_if_earlier_entry_warns(model):
    with pytest.warns(ConfigWarning) as caught:
        err = config_error(model, [{"op_names": ["ghost"]}, {"op_names": ["fc1"], "sparse_ratio": -1}])
    assert err.entry == 1
    assert any("ghost" in str(w.message) for w in caught)


def test_float_values_are_not_rounded(model):
    recs = records_of(model, [{"op_names": ["fc1"], "sparse_ratio": 1 / 3}])
    assert math.isclose(recs[("fc1", "weight")].settings.sparse_ratio, 1 / 3, rel_tol=0, abs_tol=0)


def test_sparse_threshold_must_be_finite():
    from compress_core.config import PruningSetting, structure_setting

    with pytest.raises(ConfigError) as info:
        structure_setting({"sparse_threshold": float("nan")}, PruningSetting, entry=2)
    assert info.value.entry == 2
    assert info.value.key == "sparse_threshold"
    assert "finite" in info.value.reason
