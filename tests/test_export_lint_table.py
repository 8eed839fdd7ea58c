"""The TensorRT operator table the export lint reads: the shipped upstream file, its version, its parse."""
from __future__ import annotations

import re

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from diffgap.export import lint  # noqa: E402

# ONNX's experimental ops of opset 1 that onnx.defs no longer lists, while TensorRT's table still does.
_ONNX_RETIRED_EXPERIMENTAL = {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}


def test_table_version_is_the_one_its_file_states():
    text = lint.OPERATORS_DOC.read_text(encoding="utf-8")
    header = re.search(r"TensorRT (\d+)\.(\d+) supports operators", text)
    assert header is not None
    stated = (int(header[1]), int(header[2]))
    assert lint.OPERATORS_DOC_TRT == stated == lint.documented_table().trt_version
    assert f"_{stated[0]}.{stated[1]}.md" in lint.OPERATORS_DOC.name  # the file name says the same release
    assert stated <= lint.TARGET_TRT  # a table newer than the floor target would accept ops the floor lacks
    assert "onnx-tensorrt" in lint.OPERATORS_DOC_SOURCE and "docs/operators.md" in lint.OPERATORS_DOC_SOURCE


def test_every_row_of_the_support_matrix_is_parsed():
    text = lint.OPERATORS_DOC.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"\|\s*[A-Z]\w*\s*\|\s*[YN]\s*(\||$)", line)]
    table = lint.documented_table()
    ops = set(table.types) | table.unsupported
    assert len(ops) == len(rows) == len(table.types) + len(table.unsupported)
    known_types = set(lint._ELEM.values()) | {"FP8", "INT4"}
    for op, types in table.types.items():
        assert types and set(types) <= known_types, (op, types)  # a shifted column would show up here
    # Independent reference: ONNX's own operator registry knows every op the table names.
    assert {op for op in ops if not onnx.defs.has(op)} <= _ONNX_RETIRED_EXPERIMENTAL


def test_lint_follows_the_table_not_a_copy():
    """A graph is judged by the parsed table: an op the table marks N fails, a supported op with a
    type outside its "Supported Types" fails, the same op in a listed type passes."""
    table = lint.documented_table()
    unsupported = sorted(op for op in table.unsupported if onnx.defs.has(op))[0]

    def model(op, dtype):
        x = helper.make_tensor_value_info("x", dtype, ["batch", 4])
        y = helper.make_tensor_value_info("y", dtype, ["batch", 4])
        g = helper.make_graph([helper.make_node(op, ["x"], ["y"], name="n")], "g", [x], [y])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    rep = lint.lint_model(model(unsupported, TensorProto.FLOAT))
    assert any(unsupported in e and table.label in e for e in rep.errors), rep.errors
    assert "INT32" not in table.types["Sqrt"]
    assert any("Sqrt" in e and "INT32" in e for e in lint.lint_model(model("Sqrt", TensorProto.INT32)).errors)
    ok = lint.lint_model(model("Sqrt", TensorProto.FLOAT))
    assert ok.ok and ok.checked_against[0] == table.label, ok.format()


def test_a_table_newer_than_the_target_is_refused():
    with pytest.raises(ValueError, match="newer than the target"):
        lint.lint_model(helper.make_model(helper.make_graph([], "g", [], [])), target=(9, 0))


@pytest.mark.gpu
def test_installed_tensorrt_parses_every_op_the_table_documents():
    """On a GPU host the installed parser (>= the floor target) supports every op the older table lists."""
    pytest.importorskip("tensorrt", reason="needs TensorRT (GPU hosts: pip install -e .[gpu])")
    table = lint.documented_table()
    asked = lint.tensorrt_parser_support(table.types)
    if asked is None:
        pytest.skip("TensorRT cannot create a builder on this host (no usable CUDA device)")
    version, support = asked
    assert not [op for op, ok in support.items() if not ok], f"TensorRT {version} refuses ops its 10.0 table lists"
