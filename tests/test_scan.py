"""The selective scan: the fused kernel and the chunked scan against the sequential definition, their cost
structure, precision, denormals, scan orders by positions, and the fused kernel's fallback."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mambaout.layers import SSMMixer, scan_macs, selective_scan
from mambaout.layers import scan_fused as scan_fused_module
from mambaout.layers.scan import SCAN_METHODS, _Chunked, _exp2_

LENGTHS = (1, 7, 49, 196, 3136)
FAST_METHODS = ("fused", "chunked")


def scan_inputs(batch=2, channels=4, state=3, length=49, groups=None, dtype=torch.float64, delta_scale=0.5):
    """Random scan inputs with every tensor argument requiring grad: u, delta, A, B, C, D, delta_bias."""
    shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    tensors = (
        torch.randn(batch, channels, length, dtype=dtype),
        torch.randn(batch, channels, length, dtype=dtype) * delta_scale,
        -torch.rand(channels, state, dtype=dtype) * 4 - 0.1,
        torch.randn(shape, dtype=dtype),
        torch.randn(shape, dtype=dtype),
        torch.randn(channels, dtype=dtype),
        torch.randn(channels, dtype=dtype) * 0.3,
    )
    return [t.requires_grad_() for t in tensors]


def run(inputs, method, positions=None):
    """Output and the gradients of every input under a position-weighted loss."""
    u, delta, A, B, C, D, bias = inputs
    y = selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True, method=method, positions=positions)
    weights = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    return y, torch.autograd.grad((y * weights).sum(), inputs)


def assert_relative(got, want, tol):
    scale = want.abs().max().clamp_min(1e-30)
    assert ((got - want).abs().max() / scale).item() <= tol


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("groups", [None, 2])
def test_fast_methods_equal_the_definition_in_fp64(method, length, groups):
    inputs = scan_inputs(length=length, groups=groups)
    y, grads = run(inputs, method)
    y_ref, grads_ref = run(inputs, "sequential")
    assert y.shape == inputs[0].shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for name, g, g_ref in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("length", LENGTHS)
def test_fast_methods_equal_the_definition_in_fp32(method, length):
    inputs = scan_inputs(batch=2, channels=6, state=4, length=length, groups=2, dtype=torch.float32)
    y, grads = run(inputs, method)
    y_ref, grads_ref = run(inputs, "sequential")
    assert y.dtype == torch.float32
    assert_relative(y, y_ref, 1e-4)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_relative(g, g_ref, 1e-4)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_stays_finite_where_an_exp_of_minus_the_cumulative_sum_would_overflow(method):
    # Δ·A sums to about -4e5 over the sequence: exp(-cumsum) overflows float32 after ~90 of it
    inputs = scan_inputs(channels=3, length=3136, dtype=torch.float32, delta_scale=10.0)
    y, grads = run(inputs, method)
    y_ref, grads_ref = run(inputs, "sequential")
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert_relative(y, y_ref, 1e-4)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_relative(g, g_ref, 1e-4)


def _saved_bytes_and_nodes(length: int, method: str) -> tuple[int, int]:
    """Bytes autograd keeps for backward, and autograd graph nodes, of one scan."""
    inputs = scan_inputs(batch=1, channels=4, state=3, length=length, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        u, delta, A, B, C, D, bias = inputs
        y = selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True, method=method)
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return sum(saved), len(seen)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_memory_kept_for_backward_grows_linearly_and_the_graph_does_not_grow(method):
    bytes_short, nodes_short = _saved_bytes_and_nodes(196, method)
    bytes_long, nodes_long = _saved_bytes_and_nodes(4 * 196, method)
    assert bytes_long <= 4 * bytes_short  # linear in L (A, the same at both lengths, makes it a little less)
    assert bytes_long >= 3.5 * bytes_short
    assert nodes_long == nodes_short  # one node for the scan, whatever L
    # the definition's graph has nodes per position: linear, but no quadratic indexing either
    assert _saved_bytes_and_nodes(4 * 196, "sequential")[1] > 4 * 196


class _CountWork(TorchDispatchMode):
    """Counts the ops run and the elements they write."""

    def __init__(self):
        super().__init__()
        self.ops, self.elements = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.elements += sum(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _backward_work(length: int, method: str) -> _CountWork:
    inputs = scan_inputs(batch=1, channels=4, state=3, length=length, dtype=torch.float32)
    u, delta, A, B, C, D, bias = inputs
    y = selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True, method=method)
    with _CountWork() as work:
        y.sum().backward()
    return work


@pytest.mark.parametrize("method", SCAN_METHODS)
def test_backward_work_grows_linearly(method):
    short, long = _backward_work(196, method), _backward_work(4 * 196, method)
    assert long.elements <= 4.4 * short.elements  # a quadratic backward would write 16x
    assert long.ops <= 4 * short.ops
    if method == "chunked":
        assert long.ops <= 2.5 * short.ops  # √L steps: 2x the ops for 4x the length
    if method == "fused":
        assert long.ops == short.ops  # one kernel call, whatever L


class _RecordDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "selective_scan" in str(func):
            self.calls.append([a.dtype for a in args if isinstance(a, torch.Tensor)] + [out.dtype])
        return out


@pytest.mark.parametrize("method", FAST_METHODS)
def test_state_is_float32_under_bf16_autocast(method):
    u, delta, A, B, C, D, bias = (t.detach() for t in scan_inputs(length=196, dtype=torch.float32))
    low = [t.bfloat16() for t in (u, delta, B, C)]
    with torch.autocast("cpu", dtype=torch.bfloat16), _RecordDtypes() as record:
        y = selective_scan(low[0], low[1], A, low[2], low[3], D=D, delta_bias=bias, delta_softplus=True, method=method)
    assert y.dtype == torch.bfloat16
    assert record.calls and all(d == torch.float32 for call in record.calls for d in call)  # the scan runs in fp32
    # the same bf16 inputs scanned in float64: only the final rounding to bf16 separates them
    ref = selective_scan(*(t.double() for t in (low[0], low[1], A, low[2], low[3])), D=D.double(),
                         delta_bias=bias.double(), delta_softplus=True, method="sequential")  # fmt: skip
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()


def test_exponentials_flush_to_zero_instead_of_denormals():
    tiny = torch.finfo(torch.float32).tiny
    exponents = torch.linspace(-200, 0, 100_001)  # base 2: float32's smallest normal number is 2**-126
    values = _exp2_(exponents.clone())
    assert not ((values != 0) & (values.abs() < tiny)).any()  # no denormal
    torch.testing.assert_close(values[exponents > -120], exponents[exponents > -120].exp2())
    assert (values[exponents < -127] == 0).all()
    assert _exp2_(torch.tensor([math.nan])).isnan().all()
    # a scan's decays with Δ·A reaching -300 per position and far more per chunk: zeros, never denormals
    u, delta, A, B, C, *_ = (t.detach() for t in scan_inputs(channels=8, length=196, dtype=torch.float32))
    chunked = _Chunked(u, delta.abs() * 20, A * 4, B.unsqueeze(1), C.unsqueeze(1))
    for decays in (chunked.decay, chunked.through):
        assert (decays == 0).any()
        assert not ((decays != 0) & (decays < tiny)).any()


@pytest.mark.parametrize("method", FAST_METHODS)
def test_mac_count_reaches_flop_counter_mode(method):
    u, delta, A, B, C, D, bias = (t.detach() for t in scan_inputs(batch=3, channels=8, state=5, length=33))
    with FlopCounterMode(display=False) as counter:
        selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True, method=method)
    assert counter.get_total_flops() == 2 * scan_macs(3, 8, 33, 5) == 2 * 3 * 33 * 8 * (4 * 5 + 1)
    with torch.device("meta"):  # model_complexity counts on the meta device
        y = selective_scan(*(torch.empty_like(t, device="meta") for t in (u, delta, A, B, C)), method=method)
    assert y.shape == u.shape and y.device.type == "meta"


def test_bad_shapes_and_method_are_rejected():
    u, delta, A, B, C, *_ = (t.detach() for t in scan_inputs())
    with pytest.raises(ValueError, match="method"):
        selective_scan(u, delta, A, B, C, method="parallel")
    with pytest.raises(ValueError, match="shapes"):
        selective_scan(u, delta, A, B[..., :-1], C)
    with pytest.raises(ValueError, match="shapes"):
        selective_scan(u, delta, A, B.view(2, 1, 3, -1).expand(2, 3, 3, -1), C)  # 3 groups do not divide 4 channels


def _orders(groups: int, length: int) -> torch.Tensor:
    """A different permutation of the positions for every group (the first in order)."""
    gen = torch.Generator().manual_seed(length)
    return torch.stack([torch.arange(length)] + [torch.randperm(length, generator=gen) for _ in range(groups - 1)])


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("length", [1, 49, 196])
@pytest.mark.parametrize("shared_u", [False, True])
def test_scan_orders_by_positions_equal_the_definition_on_gathered_sequences(method, length, shared_u):
    groups, per_group = 3, 2
    inputs = scan_inputs(channels=groups * per_group, length=length, groups=groups)
    if shared_u:  # one u for every group, as a cross-scan's directions share the map
        inputs[0] = torch.randn(2, per_group, length, dtype=torch.float64, requires_grad=True)
    positions = _orders(groups, length)
    y, grads = run(inputs, method, positions)
    # the definition on copies of every sequence in each group's order, its output put back in token order
    u, delta, A, B, C, D, bias = inputs
    full_u = u.repeat(1, groups, 1) if shared_u else u
    index = positions.repeat_interleave(per_group, 0)  # [D, L]: each channel's group's order
    want = torch.empty_like(y)
    seq = selective_scan(
        full_u.gather(-1, index.expand_as(delta)), delta.gather(-1, index.expand_as(delta)), A,
        B.gather(-1, positions[None, :, None].expand_as(B)), C.gather(-1, positions[None, :, None].expand_as(C)),
        D=D, delta_bias=bias, delta_softplus=True, method="sequential",
    )  # fmt: skip
    want.scatter_(-1, index.expand_as(delta), seq)
    weights = torch.linspace(-1, 1, length, dtype=y.dtype)
    grads_ref = torch.autograd.grad((want * weights).sum(), inputs)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-10)
    for name, g, g_ref in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10, msg=f"d{name}")


def test_positions_must_be_a_permutation_per_group():
    u, delta, A, B, C, *_ = (t.detach() for t in scan_inputs(length=5, groups=2))
    with pytest.raises(ValueError, match="permutation"):
        selective_scan(u, delta, A, B, C, positions=torch.tensor([[0, 1, 2, 3, 4], [0, 0, 2, 3, 4]]))
    with pytest.raises(ValueError, match="permutation"):
        selective_scan(u, delta, A, B, C, positions=torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="positions"):
        selective_scan(u, delta, A, B, C, positions=torch.arange(5)[None])  # one row for two groups


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_scan_shares_work_between_threads_without_changing_the_result(threads, batch):
    # 64 × 40 × 16 state updates: past the size one thread takes alone; batches and groups that do not divide
    # the thread count give each group's channels to several threads (their dB, dC summed afterwards)
    inputs = scan_inputs(batch=batch, channels=64, state=16, length=40, groups=2, dtype=torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, grads = run(inputs, "fused")
    finally:
        torch.set_num_threads(previous)
    y_ref, grads_ref = run(inputs, "sequential")
    assert_relative(y, y_ref, 1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_relative(g, g_ref, 1e-5)


def test_fused_scan_flushes_decays_to_zero_instead_of_denormals():
    # Δ·A reaches -300 per position: the decays underflow, and the state must keep exactly what x_t gives it
    u, delta, A, B, C, *_ = (t.detach() for t in scan_inputs(channels=8, length=196, dtype=torch.float32))
    y = selective_scan(u, delta.abs() * 20 + 5, A * 4, B, C, method="fused")
    y_ref = selective_scan(u, delta.abs() * 20 + 5, A * 4, B, C, method="sequential")
    assert torch.isfinite(y).all()
    assert_relative(y, y_ref, 1e-5)
    nan_input = u.clone()
    nan_input[0, 0, 3] = math.nan
    y = selective_scan(nan_input, delta.abs(), A, B, C, method="fused")
    assert y[0, 0, 3:].isnan().all() and not y[0, 0, :3].isnan().any() and not y[1].isnan().any()


def test_fused_scan_falls_back_to_the_chunked_scan_with_one_warning(monkeypatch, tmp_path):
    inputs = scan_inputs(length=49, groups=2)
    y_ref, grads_ref = run(inputs, "sequential")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MAMBAOUT_KERNEL_CACHE", str(tmp_path / "cache"))
    scan_fused_module.kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*chunked scan"):
            y, grads = run(inputs, "fused")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: later calls fall back silently
            run(inputs, "fused")
        assert scan_fused_module.kernel() is None
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    finally:
        scan_fused_module.kernel.cache_clear()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_fused_kernel_source_is_package_data():
    # a wheel install compiles the kernel from the shipped source: pyproject's package-data must name it
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]\nmambaout = [")[1].split("]")[0]
    assert '"layers/*.cpp"' in package_data.split(", ")
    assert scan_fused_module._SOURCE.parent == Path(scan_fused_module.__file__).parent


def test_fused_kernel_is_built_once_per_source_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBAOUT_KERNEL_CACHE", str(tmp_path))
    scan_fused_module.kernel.cache_clear()
    try:
        assert scan_fused_module.kernel() is not None
        built = list(tmp_path.glob("scan_fused-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob(".*.tmp"))
        mtime = built[0].stat().st_mtime_ns
        scan_fused_module.kernel.cache_clear()
        assert scan_fused_module.kernel() is not None  # a new process finds the library built
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        scan_fused_module.kernel.cache_clear()


@pytest.mark.parametrize("state", [1, 5, 17, 65])
def test_fused_scan_takes_any_state_size(state):
    # sizes the kernel has no vector for are padded with zero states; past 64 states the chunked scan runs
    inputs = scan_inputs(batch=2, channels=3, state=state, length=20)
    y, grads = run(inputs, "fused")
    y_ref, grads_ref = run(inputs, "sequential")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_ssm_positions_made_under_inference_mode_serve_training_later():
    mixer = SSMMixer(8, state_size=4, scan_directions=4)
    x = torch.randn(1, 3, 5, 8)
    with torch.inference_mode():
        mixer(x)  # the first call at this map size caches its scan orders
    mixer(x).sum().backward()
    assert mixer.x_proj_weight.grad is not None
