"""The token mixers of the paper's argument in the Gated CNN block: causality, batch independence, gradients,
layouts and shapes for every mixer, and the Mamba block's SSM against the scan's definition."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mambaout
from mambaout.errors import UserError
from mambaout.layers import TOKEN_MIXERS, GatedCNNBlock, SSMMixer, selective_scan
from mambaout.models import MambaOut

MIXERS = list(TOKEN_MIXERS)
CAUSAL = [name for name in MIXERS if name.startswith("causal_")]
DIM, HEIGHT, WIDTH = 16, 5, 7  # a non-square map


def block(name: str, **kw) -> GatedCNNBlock:
    return GatedCNNBlock(DIM, token_mixer=name, kernel_size=5, **kw).eval()


METHODS = ("fused", "sequential")


class _Ops(TorchDispatchMode):
    """Names of the aten ops run."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_mixer_names_are_the_issues():
    assert MIXERS == ["conv", "conv_ssm", "causal_conv", "causal_conv_ssm", "attention", "causal_attention"]


@pytest.mark.parametrize("name", MIXERS)
def test_block_maps_channels_last_to_channels_last_on_non_square_maps(name):
    b = block(name)
    x = torch.randn(2, HEIGHT, WIDTH, DIM)
    with torch.no_grad():
        y = b(x)
        mixed = b.mixer(torch.randn(2, HEIGHT, WIDTH, b.split_sizes[2]))
    assert y.shape == x.shape and mixed.shape == (2, HEIGHT, WIDTH, b.split_sizes[2])
    assert torch.isfinite(y).all()
    # a channels-last view of an NCHW tensor (other strides, same values) gives the same output
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(b(strided), y)


@pytest.mark.parametrize("name", MIXERS)
def test_each_image_is_mixed_alone(name):
    b = block(name)
    x = torch.randn(3, HEIGHT, WIDTH, DIM)
    other = x.clone()
    other[1:] = torch.randn(2, HEIGHT, WIDTH, DIM)
    with torch.no_grad():
        y, y_other, y_alone = b(x), b(other), b(x[:1])
    assert torch.equal(y[0], y_other[0])  # other images in the batch change nothing
    torch.testing.assert_close(y_alone[0], y[0], rtol=1e-5, atol=1e-6)  # nor does the batch size


@pytest.mark.parametrize("name", MIXERS)
def test_every_parameter_receives_a_gradient(name):
    b = block(name).train()
    b(torch.randn(2, HEIGHT, WIDTH, DIM)).square().mean().backward()
    for pname, p in b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def _changed_after(x: torch.Tensor, t: int) -> torch.Tensor:
    """`x` with every token after raster position `t` replaced."""
    out = x.clone()
    tokens = out.view(x.shape[0], -1, x.shape[-1])  # [B, H·W, C] view in raster order
    tokens[:, t + 1 :] = torch.randn_like(tokens[:, t + 1 :]) * 3
    return out


@pytest.mark.parametrize("name", MIXERS)
def test_causal_mixers_make_the_block_causal_and_the_others_do_not(name):
    b = block(name)
    x = torch.randn(2, HEIGHT, WIDTH, DIM)
    length = HEIGHT * WIDTH
    with torch.no_grad():
        y = b(x).reshape(2, length, DIM)
        for t in (0, WIDTH - 1, WIDTH + 2, length - 2):
            y_changed = b(_changed_after(x, t)).reshape(2, length, DIM)
            same = torch.equal(y_changed[:, : t + 1], y[:, : t + 1])
            assert same if name in CAUSAL else not same, f"position {t}"
            assert not torch.equal(y_changed[:, t + 1 :], y[:, t + 1 :])


def test_causal_conv_kernel_sees_the_rows_above_and_the_left_of_its_own_row():
    mask = block("causal_conv").mixer.mask
    want = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(mask, want.float())
    assert "mask" not in block("causal_conv").state_dict()  # checkpoints keep the plain conv's keys


def test_unknown_mixer_name_is_one_line_listing_the_valid_ones():
    with pytest.raises(UserError, match="unknown token_mixer 'mamba'") as e:
        GatedCNNBlock(DIM, token_mixer="mamba")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in MIXERS)
    with pytest.raises(UserError, match="unknown token_mixer"):
        mambaout.create_model("mambaout_femto", token_mixer="ssm")


@pytest.mark.parametrize("name", MIXERS)
def test_create_model_builds_every_mixer(name):
    model = mambaout.create_model("mambaout_femto", token_mixer=name, num_classes=3, depths=(1, 1), dims=(16, 24))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 40, 56))
    assert logits.shape == (2, 3)
    mixers = [blk.mixer for stage in model.stages for blk in stage.blocks]
    assert len(mixers) == 2 and all(type(m) is type(mixers[0]) for m in mixers)


def test_ssm_mixer_is_mambas_initialisation_and_shapes():
    mixer = SSMMixer(40, state_size=8, scan_directions=2)
    rank = math.ceil(40 / 16)
    assert mixer.dt_rank == rank
    assert mixer.x_proj_weight.shape == (2, rank + 16, 40) and mixer.dt_proj_weight.shape == (2, 40, rank)
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1.0, 9.0)).expand(80, 8))
    assert torch.equal(mixer.D, torch.ones(80))
    dt = torch.nn.functional.softplus(mixer.dt_proj_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    # the network's trunc-normal init of Linear/Conv layers leaves the SSM's parameters alone
    model = MambaOut(depths=(1,), dims=(32,), num_classes=2, token_mixer="conv_ssm")
    ssm = model.stages[0].blocks[0].mixer
    assert torch.nn.functional.softplus(ssm.dt_proj_bias).max() <= 1e-1 * (1 + 1e-4)
    assert {"stages.0.blocks.0.mixer.A_log", "stages.0.blocks.0.mixer.D"} <= model.no_weight_decay()
    assert "stages.0.blocks.0.mixer.x_proj_weight" not in model.no_weight_decay()


@pytest.mark.parametrize("method", ["fused", "chunked", "sequential"])
@pytest.mark.parametrize("directions", [1, 2, 4])
def test_ssm_mixer_sums_its_scan_orders_as_defined(directions, method):
    mixer = SSMMixer(6, kernel_size=3, state_size=4, scan_directions=directions, scan_method=method).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)  # [B, H, W, C]
    with torch.no_grad():
        got = mixer(x)
        v = mixer.act(mixer.conv(x))
        rows = v.flatten(1, 2).transpose(1, 2)  # [B, C, L], raster order
        cols = v.transpose(1, 2).flatten(1, 2).transpose(1, 2)  # column-major order
        orders = {1: [rows], 2: [rows, rows.flip(-1)], 4: [rows, cols, rows.flip(-1), cols.flip(-1)]}[directions]
        want = torch.zeros(2, 6, 3, 4, dtype=torch.float64)
        for k, seq in enumerate(orders):
            dt, B, C = torch.einsum("bcl,rc->brl", seq, mixer.x_proj_weight[k]).split((mixer.dt_rank, 4, 4), 1)
            channels = slice(6 * k, 6 * (k + 1))
            y = selective_scan(
                seq, torch.einsum("brl,cr->bcl", dt, mixer.dt_proj_weight[k]), -mixer.A_log[channels].exp(), B, C,
                D=mixer.D[channels], delta_bias=mixer.dt_proj_bias[k], delta_softplus=True, method="sequential",
            )  # fmt: skip
            if k >= len(orders) // 2 and directions > 1:
                y = y.flip(-1)
            column_major = directions == 4 and k % 2 == 1
            want += y.unflatten(-1, (4, 3)).transpose(2, 3) if column_major else y.unflatten(-1, (3, 4))
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_ssm_mixer_gradients_match_the_definition_on_a_non_square_map(directions):
    mixers = [SSMMixer(8, kernel_size=3, state_size=4, scan_directions=directions, scan_method=m) for m in METHODS]
    for mixer in mixers[1:]:
        mixer.load_state_dict(mixers[0].state_dict())
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)  # [B, H, W, C]
    results = []
    for mixer in mixers:
        mixer.double()
        xi = x.clone().requires_grad_()
        y = mixer(xi)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [xi, *mixer.parameters()])
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_fused_cross_scan_makes_no_copy_per_direction():
    mixer = SSMMixer(16, state_size=4, scan_directions=4)
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        mixer(x)  # the orders' positions are made once per map size
        with _Ops() as ops:
            mixer(x)
    assert not {"flip", "stack", "cat", "gather", "scatter"} & set(ops.names), ops.names


def test_ssm_mixer_rejects_bad_settings():
    with pytest.raises(UserError, match="scan_directions"):
        SSMMixer(8, scan_directions=3)
    with pytest.raises(UserError, match="causal"):
        SSMMixer(8, causal=True, scan_directions=2)
    with pytest.raises(UserError, match="scan_method"):
        SSMMixer(8, scan_method="cuda")


def test_mixer_kwargs_reach_the_mixer():
    model = MambaOut(depths=(1,), dims=(16,), token_mixer="conv_ssm", mixer_kwargs={"scan_directions": 2})
    assert len(model.stages[0].blocks[0].mixer.orders) == 2
    attn = GatedCNNBlock(64, token_mixer="attention", mixer_kwargs={"head_dim": 16}).mixer
    assert attn.heads == 4 and not attn.causal


@pytest.mark.parametrize("name", MIXERS)
def test_every_mixer_block_traces_with_torch_fx(name):
    b = block(name)
    graph = torch.fx.symbolic_trace(b)
    x = torch.randn(2, HEIGHT, WIDTH, DIM)
    with torch.no_grad():
        assert torch.equal(graph(x), b(x))
