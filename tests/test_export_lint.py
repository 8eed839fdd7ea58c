"""TensorRT compatibility lint: passes on clean graphs, fails with a clear reason on bad ones."""
from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from diffgap.export.lint import documented_table, lint_model  # noqa: E402


def _model(nodes, inputs, outputs, opset=17, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, et=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, et, list(shape))


def test_clean_graph_passes():
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
         helper.make_node("Shape", ["s"], ["shp"], name="shape"),  # int64 shape tensor: accepted
         helper.make_node("Reshape", ["s", "shp"], ["y"], name="reshape")],
        [_vi("x")], [_vi("y")], initializers=[w],
    )
    rep = lint_model(m)
    assert rep.ok, rep.format()
    assert "PASS" in rep.format()


def test_loop_fails():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         _vi("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _vi("v_out")],
    )
    trip = helper.make_tensor("trip", TensorProto.INT64, [], [3])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    m = _model([helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body, name="loop")],
               [_vi("x")], [_vi("y")], initializers=[trip, cond])
    rep = lint_model(m)
    assert not rep.ok
    assert any("Loop" in e and "control flow" in e for e in rep.errors), rep.format()
    assert "FAIL" in rep.format()


def test_if_fails():
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"])], name, [], [_vi(f"{name}_y")])

    m = _model([helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0, name="max"),
                helper.make_node("Greater", ["mx", "zero"], ["c"], name="gt"),
                helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"),
                                 else_branch=branch("else", "Neg"), name="branch")],
               [_vi("x")], [_vi("y")], initializers=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    onnx.checker.check_model(m, full_check=True)  # a valid graph: only the lint refuses it
    rep = lint_model(m)
    assert not rep.ok
    assert any("If" in e and "control flow" in e for e in rep.errors), rep.format()


def test_sequence_ops_fail():
    m = _model([helper.make_node("SequenceConstruct", ["x"], ["s"], name="sc"),
                helper.make_node("SequenceAt", ["s", "zero"], ["y"], name="sa")],
               [_vi("x")], [_vi("y")], initializers=[helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    rep = lint_model(m)
    assert not rep.ok and any("sequence" in e for e in rep.errors)


def test_unsupported_op_and_int64_and_double_fail():
    m = _model([helper.make_node("Unique", ["x"], ["y"], name="u")], [_vi("x")], [_vi("y", shape=("batch",))])
    assert any("Unique" in e and "not in TensorRT" in e for e in lint_model(m).errors)
    # int64 MatMul: TensorRT's MatMul takes FP32/FP16/BF16 only
    m = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
               [_vi("a", TensorProto.INT64), _vi("b", TensorProto.INT64, (4, 4))], [_vi("y", TensorProto.INT64)])
    errs = lint_model(m).errors
    assert any("MatMul" in e and "INT64" in e for e in errs), errs
    m = _model([helper.make_node("Add", ["a", "a"], ["y"], name="add")],
               [_vi("a", TensorProto.DOUBLE)], [_vi("y", TensorProto.DOUBLE)])
    errs = lint_model(m).errors
    assert any("DOUBLE" in e for e in errs), errs


def test_opset_and_version_gates():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], opset=23)
    assert any("opset 23" in e for e in lint_model(m).errors)
    ops = documented_table().types
    assert "Attention" not in ops  # added in TensorRT 10.14: not for a 10.12 target
    assert "Loop" in ops and "LayerNormalization" in ops and "Unique" not in ops
