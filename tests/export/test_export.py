"""Exported graphs (ONNX Runtime, ``torch.export`` programs) equal eager dynenc inference.

Exports are slow (symbolic shapes), so the module makes two: a fixed budget through
``dynenc export`` (ONNX + .pt2 + int8) and runtime early exit (ONNX); the tests share them.
"""
# Installed by the Makefile: a missing runtime fails these tests, it never skips them.
import onnx
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401
import pytest
import torch

from dynenc import export
from dynenc.asr import CTCModel, ModelConfig, save_checkpoint
from dynenc.cli import main
from dynenc.methods import (BlankSkipBudget, EarlyExitBudget, FullBudget, LayerDropBudget,
                            SelectorBudget, frame_confidence, infer)
from dynenc.routing import valid_frames

from dispatch_counting import SYNCS, CountOps, counting

# 3 layers, an exit at depth 1: n=2 every-other runs layers 1 and 2 (layer 0 skipped).
CONFIG = ModelConfig(vocab_size=12, num_features=16, dim=32, num_heads=2, ffn_dim=64, num_layers=3, kernel_size=5,
                     dropout=0.0, exit_depths=(1,))
FP32_TOLERANCE = 1e-4  # log-probabilities, ONNX Runtime / torch.export vs eager dynenc
INT8_TOLERANCE = 0.5   # log-probabilities, dynamic-int8 linears vs fp32


def _model() -> CTCModel:
    torch.manual_seed(0)
    model = CTCModel(CONFIG).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong layer or a leaked pad shows
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, model):
    """``dynenc export ckpt --n-layers 2 --out fixed.onnx fixed.pt2 --int8``: the paths."""
    out = tmp_path_factory.mktemp("fixed")
    save_checkpoint(out / "model.pt", model)
    paths = {"onnx": out / "fixed.onnx", "pt2": out / "fixed.pt2", "int8": out / "fixed.int8.onnx"}
    assert main(["export", str(out / "model.pt"), "--n-layers", "2", "--out", str(paths["onnx"]), str(paths["pt2"]),
                 "--int8"]) == 0
    return paths


@pytest.fixture(scope="module")
def early_exit(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("early_exit") / "exits.onnx"
    export.save(export.EarlyExitGraph(model), path)
    return path


def _batch(lengths, frames=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    features = torch.randn(len(lengths), frames or int(lengths.max()), CONFIG.num_features, generator=generator)
    return features, lengths


def _assert_close_on_valid_frames(actual, expected, lengths, tolerance):
    valid = valid_frames(lengths, expected.shape[1])
    difference = (torch.as_tensor(actual) - expected).abs().amax(-1)[valid]
    assert difference.max() <= tolerance, f"max |difference| {difference.max():.3g} > {tolerance}"


BATCHES = [pytest.param([97, 60, 23], id="ragged_batch"), pytest.param([80], id="one_utterance"),
           pytest.param([9], id="one_output_frame")]


@pytest.mark.parametrize("lengths", BATCHES)
def test_fixed_budget_onnx_equals_eager(fixed, model, lengths):
    features, lengths = _batch(lengths)
    expected = infer(model, features, lengths, LayerDropBudget(2))
    log_probs, out_lengths = export.run_onnx(export.onnx_session(fixed["onnx"]), features, lengths)
    assert out_lengths.tolist() == expected.lengths.tolist()
    _assert_close_on_valid_frames(log_probs, expected.log_probs, expected.lengths, FP32_TOLERANCE)


def test_fixed_budget_pt2_equals_eager(fixed, model):
    features, lengths = _batch([90, 41])
    program = torch.export.load(fixed["pt2"])
    log_probs, out_lengths = program.module()(features, lengths)
    expected = infer(model, features, lengths, LayerDropBudget(2))
    assert out_lengths.tolist() == expected.lengths.tolist()
    _assert_close_on_valid_frames(log_probs, expected.log_probs, expected.lengths, FP32_TOLERANCE)
    # Only the executed layers (1 and 2 of 0..2) are in the program: layer 0's parameters are not.
    skipped = ("encoder.conformer_layers.0.", "exit_heads.")
    executed = [name for name in model.state_dict() if not name.startswith(skipped)]
    assert len(program.state_dict) == len(executed)


def test_fixed_budget_graph_needs_no_host_sync_and_no_dynenc_op(model):
    """The capturable path (CUDA graphs, ``mode="reduce-overhead"``): a fixed budget runs
    with static shapes, so nothing in it waits for the device or needs a dynenc op."""
    features, lengths = _batch([90, 41])
    graph = export.fixed_budget_graph(model, LayerDropBudget(2))
    with torch.no_grad(), counting(CountOps()) as counter:
        graph(features, lengths)
    assert counter.syncs == 0, {op: n for op, n in counter.ops.items() if op in SYNCS | {"tolist"}}
    assert not [op for op in counter.ops if op.startswith("dynenc.")]


def test_fixed_budget_graph_compiles_to_one_graph(model):
    """``fullgraph=True`` fails on any graph break, so capture never falls back to eager."""
    features, lengths = _batch([90, 41])
    graph = export.fixed_budget_graph(model, LayerDropBudget(2))
    compiled = torch.compile(graph, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        (got, got_lengths), (expected, expected_lengths) = compiled(features, lengths), graph(features, lengths)
    assert got_lengths.tolist() == expected_lengths.tolist()
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fixed_budget_graph_replays_in_a_cuda_graph():
    """Captured once, replayed on new inputs of the same shape: equals eager inference."""
    model = _model().cuda()  # not the shared fixture: the graph shares (moves) its parameters
    graph = export.fixed_budget_graph(model, LayerDropBudget(2))
    static_features, static_lengths = (t.cuda() for t in _batch([90, 41], seed=1))
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
            graph(static_features, static_lengths)
        torch.cuda.current_stream().wait_stream(stream)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            static_log_probs, static_out_lengths = graph(static_features, static_lengths)
        features, lengths = _batch([90, 67], seed=2)
        static_features.copy_(features)
        static_lengths.copy_(lengths)
        captured.replay()
        expected = infer(model, features.cuda(), lengths.cuda(), LayerDropBudget(2))
    assert static_out_lengths.tolist() == expected.lengths.tolist()
    _assert_close_on_valid_frames(static_log_probs.cpu(), expected.log_probs.cpu(), expected.lengths.cpu(),
                                  FP32_TOLERANCE)


def _nodes(graph):
    """Every node of an ONNX graph, inside If / Loop subgraphs too."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)


@pytest.mark.parametrize("which", ["fixed", "early_exit"])
def test_onnx_graph_has_only_standard_ops(request, which):
    path = request.getfixturevalue(which)
    path = path["onnx"] if which == "fixed" else path
    loaded = onnx.load(str(path))
    domains = {node.domain for node in _nodes(loaded.graph)}
    assert domains <= {"", "ai.onnx"}, domains  # no dynenc (nor any custom) op
    assert "If" in {node.op_type for node in _nodes(loaded.graph)} or which == "fixed"
    metadata = {prop.key: prop.value for prop in loaded.metadata_props}
    assert metadata["dynenc.graph"] == ("fixed_budget" if which == "fixed" else "early_exit")


def test_int8_runs_and_is_close(fixed, model):
    features, lengths = _batch([97, 60])
    fp32 = export.run_onnx(export.onnx_session(fixed["onnx"]), features, lengths)[0]
    int8 = export.run_onnx(export.onnx_session(fixed["int8"]), features, lengths)[0]
    _assert_close_on_valid_frames(int8, torch.from_numpy(fp32), model.frontend.output_lengths(lengths),
                                  INT8_TOLERANCE)
    op_types = {node.op_type for node in _nodes(onnx.load(str(fixed["int8"])).graph)}
    assert "DynamicQuantizeLinear" in op_types or "MatMulInteger" in op_types, op_types


def _exit_confidence(model, features, lengths, exit_depth, criterion):
    """Eager mean frame confidence of the utterance at ``exit_depth``'s head."""
    with torch.no_grad():
        x, x_lengths = model.embed(features, lengths)
        out = model.encoder(x, x_lengths, return_hidden=True)
        hidden = out.packed.unpack(out.hidden[exit_depth - 1])
        log_probs = torch.log_softmax(model.exit_head(exit_depth)(hidden), -1)
        return float(frame_confidence(log_probs, criterion).mean())


def _thresholds(confidence, low, high):
    """One threshold below the first exit's confidence (it exits there), one above (it does not)."""
    return [(confidence + low) / 2, (confidence + high) / 2]


def test_runtime_early_exit_onnx_matches_eager(early_exit, model):
    features, lengths = _batch([120])
    session = export.onnx_session(early_exit)
    confidence = _exit_confidence(model, features, lengths, 1, "max_prob")
    exits = []
    for threshold in _thresholds(confidence, 0.0, 1.0):
        expected = infer(model, features, lengths, EarlyExitBudget(threshold=threshold, criterion="max_prob"))
        log_probs, out_lengths, exit_depth = export.run_onnx(session, features, lengths, threshold)
        assert exit_depth.tolist() == expected.decisions.exit_depth.tolist()
        _assert_close_on_valid_frames(log_probs, expected.log_probs, expected.lengths, FP32_TOLERANCE)
        exits.append(int(exit_depth[0]))
    assert exits == [1, 3]


def test_early_exit_graph_entropy_matches_eager(model):
    """The entropy criterion in the graph (checked on the module; the export path is the same)."""
    features, lengths = _batch([100])
    graph = export.EarlyExitGraph(model, "entropy")
    confidence = _exit_confidence(model, features, lengths, 1, "entropy")
    for threshold in _thresholds(confidence, 2 * confidence, 0.0):
        expected = infer(model, features, lengths, EarlyExitBudget(threshold=threshold, criterion="entropy"))
        with torch.no_grad():
            log_probs, _, exit_depth = graph(features, lengths, torch.tensor(threshold))
        assert exit_depth.tolist() == expected.decisions.exit_depth.tolist()
        _assert_close_on_valid_frames(log_probs, expected.log_probs, expected.lengths, FP32_TOLERANCE)


def test_budget_plans(model):
    assert export.budget_plan(model, FullBudget()) == export.ExportPlan((0, 1, 2), 3)
    assert export.budget_plan(model, LayerDropBudget(2)) == export.ExportPlan((1, 2), 3)
    assert export.budget_plan(model, EarlyExitBudget(fixed_exit=1)) == export.ExportPlan((0,), 1)
    features, lengths = _batch([60])
    plan = export.budget_plan(model, LayerDropBudget(2, "random"), features, lengths)  # that utterance's draw
    assert len(plan.layers) == 2 and set(plan.layers) <= {0, 1, 2} and plan.head_depth == 3
    exited = export.budget_plan(model, EarlyExitBudget(threshold=0.0, criterion="max_prob"), features, lengths)
    assert exited == export.ExportPlan((0,), 1)


@pytest.mark.parametrize("call, error, message", [
    (lambda m: export.budget_plan(m, BlankSkipBudget(threshold=0.5)), ValueError, "decides per frame"),
    (lambda m: export.budget_plan(m, LayerDropBudget(2, "random")), ValueError, "ONE utterance"),
    (lambda m: export.budget_plan(m, SelectorBudget(k=1)), ValueError, "selector"),
    (lambda m: export.budget_plan(m, "n=2"), TypeError, "budget must be"),
    (lambda m: export.fixed_budget_graph(m, layers=[1, 3]), ValueError, "0-based layers in [0, 2]"),
    (lambda m: export.fixed_budget_graph(m, layers=[1, 1]), ValueError, "distinct"),
    (lambda m: export.fixed_budget_graph(m, layers="12"), TypeError, "sequence of ints"),
    (lambda m: export.fixed_budget_graph(m, FullBudget(), layers=[1]), ValueError, "exactly one of"),
    (lambda m: export.FixedBudgetGraph(m, export.ExportPlan((0, 1), 2)), ValueError, "head_depth must be one of"),
    (lambda m: export.EarlyExitGraph(m, "nbest_posterior"), ValueError, "beam search"),
    (lambda m: export.EarlyExitGraph(CTCModel(ModelConfig(num_layers=2))), ValueError, "early-exit heads"),
    (lambda m: export.save(export.EarlyExitGraph(m), "graph.tflite"), ValueError, "must end in one of"),
    (lambda m: export.export_program(m), TypeError, "FixedBudgetGraph or an EarlyExitGraph"),
])
def test_bad_arguments_raise_clear_errors(model, call, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(model)


@pytest.mark.parametrize("flags, message", [
    (["--out", "model.tflite"], "an output file must end in one of"),
    (["--out", "model.pt2", "--int8"], "--int8 quantizes an ONNX file"),
    (["--out", "model.onnx", "--exit-depth", "2"], "fixed_exit must be one of the model's exit depths"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, model, flags, message):
    save_checkpoint(tmp_path / "model.pt", model)
    flags = [str(tmp_path / f) if f.startswith("model.") else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "model.pt"), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dynenc export: error:") and message in error and "\n" not in error


def test_executorch_program_equals_eager(tmp_path, model):
    """Only where the optional executorch package imports beside this torch."""
    runtime = pytest.importorskip("executorch.runtime")
    path = tmp_path / "fixed.pte"
    export.save(export.fixed_budget_graph(model, LayerDropBudget(2)), path)
    features, lengths = _batch([90, 41])
    method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
    log_probs, out_lengths = method.execute([features, lengths])
    expected = infer(model, features, lengths, LayerDropBudget(2))
    assert out_lengths.tolist() == expected.lengths.tolist()
    _assert_close_on_valid_frames(log_probs, expected.log_probs, expected.lengths, FP32_TOLERANCE)
