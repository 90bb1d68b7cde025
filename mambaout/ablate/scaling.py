"""Measured cost against token count: each token mixer's time and peak memory per image as the input grows.

The paper's long-sequence argument (`mambaout.ablate.tokens`) is a FLOP count: attention's `4·D·L²` passes a block's
linear layers at `L > τ = 6·D`. This measures it. One network (default femto, random weights) is built with each
token mixer; at each input size every (mixer, pass) runs in this process through the benchmark harness
(`mambaout.bench.harness.measure`, interleaved across the mixers, warm; `peak_memory_mib` for one more call), so that
other load falls on all of them alike. A training pass is the benchmark's training step
(`mambaout.bench.paths.mixer_paths`: forward, backward, AdamW).

From the rows: each mixer's growth exponent (least-squares slope of log ms/img against log tokens), and the token
count where attention's time passes the SSM's and the conv's (interpolated in log-log between measured sizes), beside
where the paper's formula puts it. Tokens are stage 1's, `(img / 4)²`; stage k has `4^(k-1)` times fewer, so stage
k's own count passes its `6·D_k` at `6·D_k·4^(k-1)` stage-1 tokens.

A size that would not fit is skipped, never run into an out-of-memory kill: before each size, each (mixer, pass) is
estimated from its activations counted analytically and from the growth of the peaks it showed at the smaller sizes,
the larger of the two; likewise its time per call, from the smaller sizes' times grown along their exponent or along
its MAC count, the larger. Sizes run smallest first.
"""

import gc
import json
import math
import os
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from torch import nn

from mambaout.ablate.tokens import model_rows
from mambaout.bench.harness import BenchPath, load_average, machine_summary, measure, peak_memory_mib
from mambaout.bench.paths import mixer_paths
from mambaout.errors import UserError
from mambaout.fast.threads import MIN_WINDOW_S, ThreadFitter
from mambaout.layers import TOKEN_MIXERS, AttentionMixer, GatedCNNBlock, SSMMixer
from mambaout.limits import MAX_INPUT_SIZE
from mambaout.models import MambaOut, create_model, get_spec, model_complexity
from mambaout.models.capacity import available_bytes
from mambaout.outputs import PNG_SOFTWARE
from mambaout.weights.io import atomic_write

__all__ = [
    "DEFAULT_SIZES",
    "PASSES",
    "SCALING_MIXERS",
    "Crossover",
    "ScalingResult",
    "ScalingRow",
    "ScalingSettings",
    "activation_bytes",
    "crossover_tokens",
    "find_crossovers",
    "growth_exponent",
    "growth_fits",
    "plot_scaling",
    "run_scaling",
    "scaling_markdown",
    "stage1_tokens",
    "tau_marks",
    "write_scaling_json",
]

SCALING_MIXERS = ("conv", "conv_ssm", "attention", "causal_conv", "causal_conv_ssm", "causal_attention")
"""The mixers measured by default: MambaOut's conv, the Mamba block's SSM, attention, and their causal forms."""
DEFAULT_SIZES = (224, 320, 448, 640, 896, 1024)
PASSES = ("inference", "train")
SIZE_STEP = 32  # the network's total stride: every stage's map is then whole
STAGE1_STRIDE = 4
MEMORY_MARGIN = 0.1  # the default limit leaves this share of the available memory, and at least 1 GiB, free
DEFAULT_TIME_LIMIT_S = 30.0
# fp32 values per token a block holds, in its widths (hidden H, dim D, mixer channels C, K scan directions, N SSM
# states): its working set while it runs (inference holds the widest block's), or what it keeps for the backward
# (a training step keeps every block's, plus one block's working set). Per hidden and per dim channel: working,
# fc1's output (2H), the gate, the concatenation, their product and GELU's temporary (4H), the input and output
# (2D); kept, about half (the training step's split linears copy neither the split nor the concatenation).
_BLOCK_VALUES = {"working": (6, 2), "kept": (3, 1)}
_CONV_VALUES = 2  # per mixer channel: the conv's input and output
_ATTENTION_VALUES = 9  # per mixer channel: qkv (3C), q, k, v made contiguous (3C), output, its transpose, proj
_SSM_VALUES = 4  # per channel and direction: the scan order's sequence, Δ, the scan's output and its map
_SSM_STATE_VALUES = {"working": 2, "kept": 1}  # per channel, direction and state: the chunked scan's decays, states
# What the count leaves out (the stem, allocator rounding, oneDNN scratch): femto's measured peaks at 128²-384²,
# batch 1, were 0.7-1.5x the count times this in inference (the lower end at 128², fixed costs), 1-2.5x in training.
ESTIMATE_SAFETY = 2.0
BYTES_PER_VALUE = 4


@dataclass
class ScalingSettings:
    """One scaling measurement; maps 1:1 to `mambaout scaling` flags.

    Attributes:
        model: Registry name; built with each token mixer (random weights, seed `seed`).
        mixers: Token mixers of `mambaout.layers.TOKEN_MIXERS`.
        sizes: Square input sizes in pixels, multiples of 32; measured smallest first.
        batch_size: Images per call.
        passes: "inference" (eval mode, no grad), "train" (the benchmark's training step) or "both".
        threads: Intra-op threads; None fits them to the cores other processes leave free.
        memory_limit_gib: A (mixer, size) estimated to need more extra memory is skipped; None: the machine's
            available memory less a margin (10%, at least 1 GiB).
        time_limit_s: A (mixer, size) estimated to take longer per call is skipped.
        repeats: Timed calls per (mixer, size), interleaved, after one warm-up call each.
        seed: Seed of the weights and images.
    """

    model: str = "mambaout_femto"
    mixers: tuple[str, ...] = SCALING_MIXERS
    sizes: tuple[int, ...] = DEFAULT_SIZES
    batch_size: int = 1
    passes: str = "inference"
    threads: int | None = None
    memory_limit_gib: float | None = None
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        get_spec(self.model)
        if not self.mixers:
            raise UserError(f"--mixers is empty: give one or more of {', '.join(TOKEN_MIXERS)}")
        unknown = [m for m in self.mixers if m not in TOKEN_MIXERS]
        if unknown:
            raise UserError(f"--mixers {','.join(unknown)}: unknown token mixer; choose from {', '.join(TOKEN_MIXERS)}")
        if len(set(self.mixers)) != len(self.mixers):
            raise UserError(f"--mixers {','.join(self.mixers)} names a mixer twice")
        if not self.sizes:
            raise UserError("--sizes is empty: give one or more input sizes, multiples of 32 (e.g. 224,448)")
        bad = [s for s in self.sizes if s < SIZE_STEP or s % SIZE_STEP or s > MAX_INPUT_SIZE]
        if bad:
            raise UserError(
                f"--sizes {','.join(map(str, bad))}: each size must be a multiple of {SIZE_STEP} within "
                f"[{SIZE_STEP}, {MAX_INPUT_SIZE}] (the network's stride: every stage's map is then whole)"
            )
        if len(set(self.sizes)) != len(self.sizes):
            raise UserError(f"--sizes {','.join(map(str, self.sizes))} names a size twice")
        self.sizes = tuple(sorted(self.sizes))
        if self.passes not in (*PASSES, "both"):
            raise UserError(f"--pass {self.passes}: choose inference, train or both")
        for flag, value in (("--batch-size", self.batch_size), ("--repeats", self.repeats)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        for flag, limit in (("--memory-limit", self.memory_limit_gib), ("--time-limit", self.time_limit_s)):
            if limit is not None and not (math.isfinite(limit) and limit > 0):
                raise UserError(f"{flag} must be a positive number, got {limit}")

    @property
    def pass_list(self) -> tuple[str, ...]:
        """The passes to measure, in table order."""
        return PASSES if self.passes == "both" else (self.passes,)

    def command(self) -> str:
        """The `mambaout scaling` command line that reproduces these settings."""
        args = ["mambaout", "scaling", "--model", self.model, "--mixers", ",".join(self.mixers)]
        args += ["--sizes", ",".join(map(str, self.sizes)), "--batch-size", str(self.batch_size)]
        args += ["--pass", self.passes, "--time-limit", f"{self.time_limit_s:g}", "--repeats", str(self.repeats)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.memory_limit_gib is not None:
            args += ["--memory-limit", f"{self.memory_limit_gib:g}"]
        return shlex.join(args)


@dataclass
class ScalingRow:
    """One (mixer, size, pass): measured, or skipped with the reason.

    Attributes:
        mixer: Token mixer.
        img_size: Square input size in pixels.
        tokens: Stage-1 tokens, `(img_size / 4)²`.
        pass_: "inference" or "train".
        ms_per_img: Median call time over the batch size, in ms (None when skipped).
        peak_mib: Extra resident memory one call took, in MiB (None when skipped or not measurable).
        status: "ok", or "skipped: <why>".
    """

    mixer: str
    img_size: int
    tokens: int
    pass_: str
    ms_per_img: float | None = None
    peak_mib: float | None = None
    status: str = "ok"

    def record(self) -> dict[str, Any]:
        """The row as JSON keys: mixer, img_size, tokens, pass, ms_per_img, peak_mib, status."""
        return {
            "mixer": self.mixer,
            "img_size": self.img_size,
            "tokens": self.tokens,
            "pass": self.pass_,
            "ms_per_img": self.ms_per_img,
            "peak_mib": self.peak_mib,
            "status": self.status,
        }


@dataclass(frozen=True)
class Crossover:
    """Where attention's time per image passes another mixer's, measured, beside the paper's formula.

    Attributes:
        pass_: "inference" or "train".
        attention: The attention mixer.
        other: The mixer it is compared with (same causality).
        tokens: Stage-1 tokens where it passes (log-log interpolation between measured sizes), or None.
        note: "measured", or why there is no crossing within the sizes measured.
    """

    pass_: str
    attention: str
    other: str
    tokens: float | None
    note: str

    @property
    def img_size(self) -> float | None:
        """The square input size whose stage 1 holds `tokens` tokens."""
        return None if self.tokens is None else STAGE1_STRIDE * math.sqrt(self.tokens)

    def record(self) -> dict[str, Any]:
        """As JSON keys: pass, attention, other, tokens, img_size, note."""
        return {
            "pass": self.pass_,
            "attention": self.attention,
            "other": self.other,
            "tokens": self.tokens,
            "img_size": self.img_size,
            "note": self.note,
        }


@dataclass
class ScalingResult:
    """A scaling measurement and the context to reproduce it.

    Attributes:
        settings: What was asked.
        rows: Every (mixer, size, pass), measured or skipped, by pass and mixer, then size.
        threads: Intra-op threads used.
        threads_source: "--threads", or "fitted" (to the free cores at the start).
        memory_limit_gib: The memory limit used (given, or the default).
        machine: `machine_summary()` at the start.
        load_after: Load average at the end.
        fits: `growth_fits(rows)`.
        crossovers: `find_crossovers(rows)`.
    """

    settings: ScalingSettings
    rows: list[ScalingRow]
    threads: int
    threads_source: str
    memory_limit_gib: float
    machine: dict[str, str]
    load_after: str
    fits: list[dict[str, Any]]
    crossovers: list[Crossover]


def stage1_tokens(img_size: int) -> int:
    """Stage-1 tokens of a square input: one per 4×4 pixels."""
    return (img_size // STAGE1_STRIDE) ** 2


def growth_exponent(tokens: Sequence[float], values: Sequence[float]) -> float | None:
    """The least-squares slope of log `values` against log `tokens`: `values ∝ tokens^slope`.

    None with fewer than two distinct token counts or a non-positive value (no logarithm).
    """
    if len(set(tokens)) < 2 or min(values, default=0) <= 0:
        return None
    return statistics.linear_regression([math.log(t) for t in tokens], [math.log(v) for v in values]).slope


def crossover_tokens(tokens: Sequence[float], attention: Sequence[float], other: Sequence[float]) -> float | None:
    """The first token count where `attention`'s cost passes `other`'s, interpolated linearly in log-log.

    Args:
        tokens: Token counts, increasing.
        attention: Attention's cost at each (positive).
        other: The other mixer's cost at each (positive).

    Returns:
        The token count between two measured ones where attention goes from at most the other's cost to more; None
        when it does not within them (already more at the first, or never more).
    """
    gaps = [math.log(a) - math.log(o) for a, o in zip(attention, other, strict=True)]
    for i in range(len(gaps) - 1):
        if gaps[i] <= 0 < gaps[i + 1]:
            share = -gaps[i] / (gaps[i + 1] - gaps[i])
            return math.exp(math.log(tokens[i]) + share * (math.log(tokens[i + 1]) - math.log(tokens[i])))
    return None


def _in_order(rows: Sequence[ScalingRow]) -> list[tuple[str, str]]:
    """The (pass, mixer) pairs of `rows`, in the order they first appear."""
    return list(dict.fromkeys((r.pass_, r.mixer) for r in rows))


def _measured(rows: Sequence[ScalingRow], pass_: str, mixer: str) -> list[ScalingRow]:
    """The measured rows of one (pass, mixer), fewest tokens first."""
    ok = [r for r in rows if r.pass_ == pass_ and r.mixer == mixer and r.status == "ok"]
    return sorted(ok, key=lambda r: r.tokens)


def growth_fits(rows: Sequence[ScalingRow]) -> list[dict[str, Any]]:
    """Each (mixer, pass)'s growth exponents: of ms/img over all sizes measured and over the upper half (where the
    asymptote shows; at least the last two), and of peak memory; None where fewer than two sizes were measured."""
    fits = []
    for pass_, mixer in _in_order(rows):
        ok = _measured(rows, pass_, mixer)
        upper = ok[min(len(ok) // 2, len(ok) - 2) :]
        peaks = [r for r in ok if r.peak_mib]
        fits.append(
            {
                "mixer": mixer,
                "pass": pass_,
                "exponent": growth_exponent([r.tokens for r in ok], [r.ms_per_img for r in ok]),
                "exponent_upper": growth_exponent([r.tokens for r in upper], [r.ms_per_img for r in upper]),
                "memory_exponent": growth_exponent([r.tokens for r in peaks], [r.peak_mib for r in peaks]),
                "sizes": [r.img_size for r in ok],
                "upper_sizes": [r.img_size for r in upper],
            }
        )
    return fits


def _crossover(rows: Sequence[ScalingRow], pass_: str, attention: str, other: str) -> Crossover:
    mine = {r.tokens: r.ms_per_img for r in _measured(rows, pass_, attention)}
    theirs = {r.tokens: r.ms_per_img for r in _measured(rows, pass_, other)}
    tokens = sorted(set(mine) & set(theirs))
    if len(tokens) < 2:
        return Crossover(pass_, attention, other, None, "not within the sizes measured (fewer than two in common)")
    a, o = [mine[t] for t in tokens], [theirs[t] for t in tokens]
    found = crossover_tokens(tokens, a, o)
    if found is not None:
        return Crossover(pass_, attention, other, found, "measured")
    side = "already dearer at the smallest" if a[0] > o[0] else "still cheaper at the largest"
    return Crossover(pass_, attention, other, None, f"not within the sizes measured ({attention} {side})")


def find_crossovers(rows: Sequence[ScalingRow]) -> list[Crossover]:
    """Where each attention mixer's time per image passes each non-attention mixer's of the same causality (attention
    against conv_ssm and conv, causal_attention against causal_conv_ssm and causal_conv), per pass."""
    crossovers = []
    for pass_, attention in _in_order(rows):
        if "attention" not in attention:
            continue
        causal = attention.startswith("causal_")
        others = [m for p, m in _in_order(rows) if p == pass_ and "attention" not in m]
        crossovers += [_crossover(rows, pass_, attention, o) for o in others if o.startswith("causal_") == causal]
    return crossovers


def tau_marks(model: str) -> list[dict[str, float]]:
    """Where each stage's own token count passes τ = 6·D, in stage-1 tokens and as a square input size.

    Stage k (stride `4·2^(k-1)`) has `4^(k-1)` times fewer tokens than stage 1, so its count `L_k` passes `6·D_k` at
    `6·D_k·4^(k-1)` stage-1 tokens.
    """
    marks = []
    for i, row in enumerate(model_rows(model, "τ", SIZE_STEP, SIZE_STEP)):
        tokens = row.tau * (row.stride // STAGE1_STRIDE) ** 2
        size = STAGE1_STRIDE * math.sqrt(tokens)
        marks.append({"stage": i + 1, "D": row.D, "tau": row.tau, "stage1_tokens": tokens, "img_size": size})
    return marks


def _math_attention(mixer: AttentionMixer, tokens: int, batch: int, train: bool) -> bool:
    """Whether `scaled_dot_product_attention` takes its math path (the L×L scores in memory) on these shapes.

    PyTorch's CPU flash kernel keeps O(L) memory; it is picked by dtype and shape, asked here through the dispatcher's
    own choice. Where PyTorch does not tell, the math path is assumed: the estimate is then an upper bound.
    """
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return True
    head_dim = mixer.qkv.in_features // mixer.heads
    q = torch.empty(batch, mixer.heads, tokens, head_dim, requires_grad=train)  # never written: no pages touched
    return int(choose(q, q, q, is_causal=mixer.causal)) == int(torch.nn.attention.SDPBackend.MATH)


def _block_values(block: GatedCNNBlock, tokens: int, batch: int, train: bool, kept: bool) -> int:
    """fp32 values per token a block holds (see `_BLOCK_VALUES`), its mixer's included: its working set, or (`kept`)
    what it keeps for the backward."""
    hidden, dim = block.fc2.in_features, block.fc2.out_features
    channels = block.split_sizes[2]
    per_hidden, per_dim = _BLOCK_VALUES["kept" if kept else "working"]
    values = per_hidden * hidden + per_dim * dim
    mixer = block.mixer
    if isinstance(mixer, SSMMixer):
        directions = len(mixer.orders)
        state_values = _SSM_STATE_VALUES["kept" if kept else "working"]
        values += directions * channels * (state_values * mixer.state_size + _SSM_VALUES)
    elif isinstance(mixer, AttentionMixer):
        values += _ATTENTION_VALUES * channels
        if _math_attention(mixer, tokens, batch, train):
            values += 2 * mixer.heads * tokens  # the scores and their softmax
    else:
        values += _CONV_VALUES * channels
    return values


def activation_bytes(model: MambaOut, img_size: int, batch: int, train: bool) -> int:
    """An estimate of the extra memory one call takes, in bytes, counted from the network's widths.

    Inference holds one block's values at a time (the widest); a training step keeps every block's for the backward,
    and a block's working values on top, plus four values per weight (its copy, gradient and AdamW moments). Times
    `ESTIMATE_SAFETY` for what the count leaves out (the stem, allocator rounding, oneDNN scratch).
    """
    working, kept = [], []
    for stage, info in zip(model.stages, model.feature_info, strict=True):
        tokens = (img_size // info["reduction"]) ** 2
        for block in stage.blocks:
            working.append(tokens * _block_values(block, tokens, batch, train, kept=False))
            kept.append(tokens * _block_values(block, tokens, batch, train, kept=True))
    values = batch * max(working)
    if train:  # and per weight: the step's own copy, its gradient and AdamW's two moments
        values += batch * sum(kept) + 4 * sum(p.numel() for p in model.parameters())
    return int(ESTIMATE_SAFETY * BYTES_PER_VALUE * values)


def _grown(points: Sequence[tuple[int, float]], tokens: int) -> float | None:
    """The last measured value grown to `tokens` along the exponent of the last two (at least 1: every layer's work
    and activations grow at least linearly in tokens; a smaller slope is fixed cost showing at small sizes)."""
    if not points:
        return None
    slope = growth_exponent(*zip(*points[-2:], strict=True)) if len(points) > 1 else None
    last_tokens, last = points[-1]
    return last * (tokens / last_tokens) ** max(1.0, slope or 1.0)


def _inference_call(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    # no_grad rather than inference_mode: a tensor a layer caches on its first call (the SSM's scan orders per map
    # size) must stay usable by the training pass of the same process
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def _default_threads() -> int:
    """The intra-op threads `ThreadFitter` gives now: PyTorch's count, less the cores other processes keep busy."""
    fitter = ThreadFitter()
    fitter.free_cores()  # opens the window the next call measures
    time.sleep(MIN_WINDOW_S)
    return fitter.fitted()


def _default_memory_limit_gib() -> float:
    free = available_bytes(torch.device("cpu"))
    if free is None:
        raise UserError("cannot read the available memory (/proc/meminfo): give --memory-limit GiB")
    return max(free - max(MEMORY_MARGIN * free, 2**30), 0) / 2**30


class _Point(NamedTuple):
    """One measured (mixer, pass, size), as estimates use it."""

    img_size: int
    tokens: int
    best_ms: float  # the fastest call per image: a call slowed by other load does not inflate the estimates
    peak_mib: float | None


class _Estimates:
    """Per (mixer, pass): the points measured so far, and what a larger size should need in memory and time."""

    def __init__(self, settings: ScalingSettings, models: dict[str, MambaOut]):
        self.settings = settings
        self.models = models
        self.measured: dict[tuple[str, str], list[_Point]] = {}
        self._macs: dict[tuple[str, int], int] = {}

    def macs(self, mixer: str, size: int) -> int:
        if (mixer, size) not in self._macs:
            self._macs[mixer, size] = model_complexity(self.settings.model, (size, size), token_mixer=mixer)[1]
        return self._macs[mixer, size]

    def memory_gib(self, mixer: str, pass_: str, size: int) -> float:
        model, batch = self.models[mixer], self.settings.batch_size
        counted = activation_bytes(model, size, batch, pass_ == "train")
        points = self.measured.get((mixer, pass_), [])
        grown = _grown([(p.tokens, p.peak_mib) for p in points if p.peak_mib], stage1_tokens(size))
        return max(counted, (grown or 0) * 2**20) / 2**30

    def seconds(self, mixer: str, pass_: str, size: int) -> float | None:
        points = self.measured.get((mixer, pass_), [])
        if not points:
            return None  # nothing to go by: the smallest size runs
        last = points[-1]
        by_macs = last.best_ms * self.macs(mixer, size) / self.macs(mixer, last.img_size)
        grown = _grown([(p.tokens, p.best_ms) for p in points], stage1_tokens(size)) or 0
        return max(by_macs, grown) * self.settings.batch_size / 1e3

    def add(self, row: ScalingRow, best_ms: float) -> None:
        """A measured row, with its fastest call per image in ms."""
        point = _Point(row.img_size, row.tokens, best_ms, row.peak_mib)
        self.measured.setdefault((row.mixer, row.pass_), []).append(point)


def _skip_reason(estimates: _Estimates, mixer: str, pass_: str, size: int, limit_gib: float) -> str | None:
    needs = estimates.memory_gib(mixer, pass_, size)
    if needs > limit_gib:
        return f"skipped: needs ~{needs:.3g} GiB > limit {limit_gib:.3g} GiB"
    seconds = estimates.seconds(mixer, pass_, size)
    limit_s = estimates.settings.time_limit_s
    if seconds is not None and seconds > limit_s:
        return f"skipped: ~{seconds:.3g} s per call > time limit {limit_s:g} s"
    return None


def _path(settings: ScalingSettings, model: MambaOut, mixer: str, pass_: str, x: torch.Tensor) -> BenchPath:
    if pass_ == "train":
        (path,) = mixer_paths(settings.model, (mixer,), x, torch.float32, None, train=True)
        return BenchPath(f"{mixer} {pass_}", path.run)
    return BenchPath(f"{mixer} {pass_}", _inference_call(model, x))


def run_scaling(settings: ScalingSettings, log: Callable[[str], None] = print) -> ScalingResult:
    """Measure every (mixer, size, pass) `settings` asks for, smallest size first, and fit and compare them.

    Args:
        settings: What to measure.
        log: Where progress lines go (one per size).

    Returns:
        The rows (measured or skipped with the reason), growth exponents, crossovers and the machine.
    """
    threads, source = (settings.threads, "--threads") if settings.threads else (_default_threads(), "fitted")
    torch.set_num_threads(threads)
    limit = settings.memory_limit_gib or _default_memory_limit_gib()
    machine = machine_summary("cpu")
    models = {}
    for mixer in settings.mixers:
        torch.manual_seed(settings.seed)
        models[mixer] = create_model(settings.model, token_mixer=mixer).eval()
    estimates = _Estimates(settings, models)
    rows = []
    for size in settings.sizes:
        todo = []
        for pass_ in settings.pass_list:
            for mixer in settings.mixers:
                reason = _skip_reason(estimates, mixer, pass_, size, limit)
                row = ScalingRow(mixer, size, stage1_tokens(size), pass_, status=reason or "ok")
                rows.append(row)
                if reason is None:
                    todo.append(row)
        log(f"{size}²: {len(todo)} of {len(settings.mixers) * len(settings.pass_list)} (mixer, pass) to measure")
        if not todo:
            continue
        x = torch.randn(settings.batch_size, 3, size, size, generator=torch.Generator().manual_seed(settings.seed))
        paths = [_path(settings, models[r.mixer], r.mixer, r.pass_, x) for r in todo]
        results = measure(paths, settings.repeats)
        for row, path, result in zip(todo, paths, results, strict=True):
            row.ms_per_img = 1e3 * statistics.median(result.latencies_s) / settings.batch_size
            row.peak_mib = peak_memory_mib(path.run)
            estimates.add(row, 1e3 * min(result.latencies_s) / settings.batch_size)
        del paths, results  # this size's models, step copies and optimizer states go before the next, larger size
        gc.collect()
    order = {(p, m): i for i, (p, m) in enumerate((p, m) for p in settings.pass_list for m in settings.mixers)}
    rows.sort(key=lambda r: (order[r.pass_, r.mixer], r.img_size))
    return ScalingResult(
        settings, rows, threads, source, limit, machine, load_average(), growth_fits(rows), find_crossovers(rows)
    )


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _tau_text(mark: dict[str, float]) -> str:
    return (
        f"stage {mark['stage']} (D={mark['D']}, τ={mark['tau']}) at {mark['stage1_tokens']:.0f} stage-1 tokens "
        f"(~{mark['img_size']:.0f}²)"
    )


def _crossover_text(c: Crossover) -> str:
    where = c.note if c.tokens is None else f"at ~{c.tokens:.0f} stage-1 tokens (~{c.img_size:.0f}²)"
    return f"{c.pass_}: `{c.attention}` passes `{c.other}` {where}"


def scaling_markdown(result: ScalingResult) -> str:
    """The measurement as Markdown: context lines, the rows, growth exponents, crossovers and the paper's τ."""
    s, m = result.settings, result.machine
    lines = [
        f"### mambaout scaling: {s.model}, batch {s.batch_size}, cpu",
        "",
        f"- command: `{s.command()}`",
        f"- machine: {m['cpu']}; torch {m['torch']}, {result.threads} thread{'' if result.threads == 1 else 's'} "
        f"({result.threads_source}); CPU memory: {m['allocator']}",
        f"- date: {m['date']}; load average (1/5/15 min) before {m['load']}, after {result.load_after}",
        f"- {s.repeats} timed calls per (mixer, size, pass) after one warm-up, interleaved across the mixers at each "
        "size; ms/img: median call / batch; peak MiB: extra resident memory of one call; tokens: stage 1's, (img/4)²",
        f"- skipped beforehand when estimated past the memory limit {result.memory_limit_gib:.3g} GiB or the time "
        f"limit {s.time_limit_s:g} s per call (the larger of an analytic count and the smaller sizes' growth)",
        "",
        "| mixer | img_size | tokens | pass | ms/img | peak MiB | status |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.mixer} | {r.img_size} | {r.tokens} | {r.pass_} | {_fmt(r.ms_per_img, 2)} | {_fmt(r.peak_mib)} | "
        f"{r.status} |"
        for r in result.rows
    ]
    lines += [
        "",
        "Growth exponents: least-squares slope of log ms/img against log tokens (1: linear, 2: quadratic), over all "
        "sizes measured and over the upper half; and of log peak MiB.",
        "",
        "| mixer | pass | exponent | exponent, upper half | memory exponent | sizes |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {f['mixer']} | {f['pass']} | {_fmt(f['exponent'], 2)} | {_fmt(f['exponent_upper'], 2)} | "
        f"{_fmt(f['memory_exponent'], 2)} | {', '.join(map(str, f['sizes'])) or '-'} |"
        for f in result.fits
    ]
    if result.crossovers:
        lines += ["", "Where attention's time per image passes the others' (log-log interpolation):", ""]
        lines += [f"- {_crossover_text(c)}" for c in result.crossovers]
    lines += ["", "The paper's formula: a stage goes long (attention's FLOPs pass its linear layers', L > τ = 6·D) at"]
    lines += [f"- {_tau_text(mark)}" for mark in tau_marks(s.model)]
    return "\n".join(lines) + "\n"


def write_scaling_json(result: ScalingResult, path: str | os.PathLike) -> Path:
    """The rows, fits, crossovers, τ marks, settings and machine as one JSON object, written atomically."""
    s = result.settings
    document = {
        "kind": "mambaout scaling",
        "command": s.command(),
        "machine": {**result.machine, "threads": str(result.threads), "load_after": result.load_after},
        "settings": {
            **asdict(s),
            "threads": result.threads,
            "threads_source": result.threads_source,
            "memory_limit_gib": result.memory_limit_gib,
        },
        "rows": [r.record() for r in result.rows],
        "fits": result.fits,
        "crossovers": [c.record() for c in result.crossovers],
        "tau": tau_marks(s.model),
    }
    path = Path(path)
    with atomic_write(path) as f:
        f.write((json.dumps(document, indent=2) + "\n").encode())
    return path


def plot_scaling(result: ScalingResult, path: str | os.PathLike) -> Path:
    """ms/img and peak MiB against stage-1 tokens, log-log, one line per (mixer, pass), with each stage's τ marked;
    written atomically as a PNG."""
    s = result.settings
    fig = Figure(figsize=(15, 5), layout="constrained")  # no pyplot: no GUI backend, no global figure state
    time_ax, memory_ax = fig.subplots(1, 2)
    colors = {m: f"C{i}" for i, m in enumerate(s.mixers)}
    for pass_ in s.pass_list:
        for mixer in s.mixers:
            ok = [r for r in result.rows if r.mixer == mixer and r.pass_ == pass_ and r.status == "ok"]
            if not ok:
                continue
            style = {"color": colors[mixer], "linestyle": "-" if pass_ == "inference" else "--", "marker": "o"}
            label = f"{mixer}, {pass_}"
            time_ax.plot([r.tokens for r in ok], [r.ms_per_img for r in ok], label=label, **style)
            peaks = [r for r in ok if r.peak_mib is not None and r.peak_mib > 0]
            memory_ax.plot([r.tokens for r in peaks], [r.peak_mib for r in peaks], **style)
    measured = [r.tokens for r in result.rows if r.status == "ok"]
    low, high = (min(measured) / 2, max(measured) * 2) if measured else (0, 0)
    for i, mark in enumerate(tau_marks(s.model)):
        if low <= mark["stage1_tokens"] <= high:
            label = (
                f"τ = 6·D of stage {mark['stage']}: L{mark['stage']} > {mark['tau']} from L1 = "
                f"{mark['stage1_tokens']:.0f} (~{mark['img_size']:.0f}²)"
            )
            time_ax.axvline(mark["stage1_tokens"], color="0.5", linestyle=":", linewidth=1 + i, label=label)
            memory_ax.axvline(mark["stage1_tokens"], color="0.5", linestyle=":", linewidth=1 + i)
    for ax, ylabel in ((time_ax, "ms per image"), (memory_ax, "peak extra memory per call (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stage-1 tokens L1 = (img / 4)²; τ marks in stage-1 tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    if time_ax.get_legend_handles_labels()[0]:
        fig.legend(*time_ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle(f"{s.model}: cost against tokens, batch {s.batch_size}, {result.threads} thread(s)")
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})
    return path
