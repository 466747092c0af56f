"""The python examples of docs/distillation.md run, each on its own (they assert their results)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compress_core
from compress_core import unwrap

DOC = Path(__file__).resolve().parent.parent / "docs" / "distillation.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_examples_for_each_part():
    assert len(BLOCKS) == 4
    joined = "\n".join(BLOCKS)
    for needle in ("total_loss", '"link": ["1", "3"]', "adaptive1d_layerwise", '"qat"'):
        assert needle in joined


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    code = BLOCKS[index]
    if '"qat"' in code and "qat" not in {m["name"] for m in compress_core.list_methods()}:
        pytest.skip("the quantization plugin does not register 'qat' here")
    namespace: dict[str, object] = {"__name__": f"distillation_md_{index}"}
    exec(compile(code, f"{DOC}[python block {index}]", "exec"), namespace)
    # The loops train: measured first-step losses are 1.409 (block 0) and 0.737 (block 2).
    if index == 0:
        assert namespace["loss"].item() < 1.36  # type: ignore[attr-defined]  # measured 1.309
    if index == 2:
        assert namespace["loss"].item() < 0.05  # type: ignore[attr-defined]  # measured 0.018
    for value in namespace.values():
        if isinstance(value, compress_core.Compressor) and hasattr(value, "close"):
            value.close()
    student = namespace.get("student")
    if student is not None:
        unwrap(student)  # type: ignore[arg-type]
