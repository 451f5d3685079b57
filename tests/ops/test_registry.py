"""The op registry as a whole (``dynenc/ops/registry.py``, :data:`dynenc.ops.OPS`): every op has
all its parts, backends are explicit and per thread, no silent fallback, torch.compile and
torch.profiler see the ops."""
import inspect
import threading

import pytest
import torch

import dynenc
from dynenc.ops import MODULES, OPS
from dynenc.ops.rows import reference_gather_rows

from conformer_pairs import CONFIGS, torchaudio_pair

FORWARD_OPS = [name for name in OPS if not name.endswith("_backward")]
# build_plan maps a bool mask to integer tensors: nothing to differentiate.
DIFFERENTIABLE_OPS = [name for name in OPS if name != "build_plan"]


# ----------------------------------------------------------------------------- the op table
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_has_cpu_and_cuda_kernels_a_fake_impl_and_a_check(name):
    qualname = f"dynenc::{name}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), f"{name}: no {key} kernel"
    assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None, f"{name}: no fake impl"
    assert callable(getattr(MODULES[OPS[name]], f"check_{name}")), f"{name}: no check_{name}"


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_every_forward_op_has_a_reference_and_a_public_function(name):
    assert dynenc.ops.reference(name) is getattr(MODULES[OPS[name]], f"reference_{name}")
    assert getattr(dynenc.ops, name) is getattr(MODULES[OPS[name]], name)


@pytest.mark.parametrize("name", DIFFERENTIABLE_OPS)
def test_every_differentiable_op_has_autograd(name):
    """Forward ops differentiate through their backward ops; those refuse double backward."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynenc::{name}", "Autograd")


def test_no_registered_op_is_missing_from_ops():
    registered = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("dynenc::")}
    assert registered == set(OPS)


@pytest.mark.parametrize("name", list(OPS))
def test_launcher_signature_matches_op_schema(name):
    """The CUDA registration calls the launchers positionally with the op's arguments."""
    kernels = pytest.importorskip("dynenc.kernels")
    schema = getattr(torch.ops.dynenc, name).default._schema
    assert list(inspect.signature(kernels.launcher(name)).parameters) == [a.name for a in schema.arguments]


def test_no_silent_fallback_on_a_device_without_kernels():
    x = torch.randn(4, 3, device="meta")
    with pytest.raises(NotImplementedError):
        torch.ops.dynenc.gather_rows(x, torch.tensor([0], device="meta")).cpu()


# ----------------------------------------------------------------------------- backends
def test_backends_are_explicit():
    assert dynenc.current_backend() == "native"
    with dynenc.use_backend("reference"):
        assert dynenc.current_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        with dynenc.use_backend("cuda"):
            pass


def run_threads(**targets):
    """Run each target in a thread named after it; re-raise the first error of any."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: B902 (reported in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,), name=n) for n, t in targets.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]


def test_backend_is_per_thread(monkeypatch):
    """While one thread is inside use_backend("reference"), another runs native."""
    reference_calls = []

    def recording_reference(x, index):
        reference_calls.append(threading.current_thread().name)
        return reference_gather_rows(x, index)

    monkeypatch.setattr(MODULES["rows"], "reference_gather_rows", recording_reference)
    x, index = torch.randn(5, 3), torch.tensor([4, 0, 4])
    both_running = threading.Barrier(2, timeout=30)
    results = {}

    def reference_thread():
        with dynenc.use_backend("reference"):
            both_running.wait()  # the native thread runs while this block is open
            results["reference"] = dynenc.current_backend(), dynenc.ops.gather_rows(x, index)
            both_running.wait()

    def native_thread():
        both_running.wait()
        results["native"] = dynenc.current_backend(), dynenc.ops.gather_rows(x, index)
        both_running.wait()

    run_threads(reference=reference_thread, native=native_thread)
    for backend, (seen, out) in results.items():
        assert seen == backend
        assert torch.equal(out, x[index]), backend
    assert reference_calls == ["reference"]


def test_overlapping_blocks_in_two_threads_leave_native():
    """first enters, second enters, first exits, second exits: not nested, so a process-wide
    save / restore of the backend would leave "reference" behind."""
    step = threading.Barrier(2, timeout=30)
    seen = {}

    def first():
        with dynenc.use_backend("reference"):
            step.wait()  # 1: first is inside
            step.wait()  # 2: second is inside
        seen["first after exit"] = dynenc.current_backend()
        step.wait()  # 3: first has left

    def second():
        step.wait()
        with dynenc.use_backend("reference"):
            step.wait()
            step.wait()
            seen["second inside after first left"] = dynenc.current_backend()
        seen["second after exit"] = dynenc.current_backend()

    run_threads(first=first, second=second)
    assert seen == {"first after exit": "native", "second inside after first left": "reference",
                    "second after exit": "native"}
    assert dynenc.current_backend() == "native"
    run_threads(fresh=lambda: seen.update(fresh=dynenc.current_backend()))
    assert seen["fresh"] == "native"


# ----------------------------------------------------------------------------- whole model
def test_native_forward_calls_the_cpp_ops():
    """Every op of the native forward appears by name in torch.profiler, plus the ranges."""
    _, model = torchaudio_pair(CONFIGS["gn_conv_first"])
    x = torch.randn(3, 9, model.input_dim)
    lengths = torch.tensor([9, 4, 6])
    mask = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, lengths, layer_mask=mask)
    names = {event.key for event in prof.key_averages()}
    for expected in ("dynenc::gather_rows", "dynenc::scatter_rows", "dynenc::gated_residual_scatter",
                     "dynenc::varlen_dwconv1d", "dynenc::varlen_attention", "dynenc::build_plan",
                     "dynenc::add_layer_norm", "dynenc.plan", "dynenc.pack", "dynenc.unpack", "dynenc.layer0", "dynenc.layer1"):
        assert expected in names, expected


def test_reference_backend_calls_no_cpp_op():
    _, model = torchaudio_pair(CONFIGS["gn_conv_first"])
    with dynenc.use_backend("reference"), torch.profiler.profile() as prof:
        model(torch.randn(2, 5, model.input_dim), torch.tensor([5, 3]))
    assert not [e.key for e in prof.key_averages() if e.key.startswith("dynenc::")]


def test_torch_compile_fullgraph_matches_eager():
    _, model = torchaudio_pair(CONFIGS["bn_attn_first"], seed=7)
    x = torch.randn(3, 10, model.input_dim)
    lengths = torch.tensor([10, 6, 3])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        eager, _ = model(x, lengths, layer_mask=mask)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            compiled = torch.compile(model, fullgraph=True)
            got, _ = compiled(x, lengths, layer_mask=mask)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
