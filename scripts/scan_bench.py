"""The selective scan's speed: the fused kernel (the default) and the chunked scan against the sequential definition.

    python scripts/scan_bench.py [--lengths 196 3136] [--batch 8] [--channels 96] [--state 16] [--repeats 5]
    python scripts/scan_bench.py --networks [--model mambaout_femto] [--threads 1]

For each length, forward and forward+backward (every input requiring grad, Mamba's Δ bias and softplus, D) of
each method are timed interleaved through the benchmark harness (`mambaout.bench.measure`) in one process, after
`tune_cpu_allocator()` as `mambaout bench` does; it prints a Markdown table with the machine, date and load.

`--networks` instead sets the Mamba block against MambaOut's: the variant built with `token_mixer="conv"` and
`"conv_ssm"` (both eager reference modules, random weights), inference at 224², batch 8, and one training step
(forward, cross-entropy, backward, AdamW) at 128², batch 8, interleaved; the ratio is MambaOut's time over the
Mamba block's (the Mamba network's speed as a share of MambaOut's).
"""

import argparse
import shlex
import sys

import torch
import torch.nn.functional as F

from mambaout import create_model
from mambaout.bench import BenchPath, machine_summary, measure
from mambaout.bench.harness import load_average
from mambaout.fast import tune_cpu_allocator
from mambaout.layers import selective_scan


def scan_call(batch: int, channels: int, state: int, length: int, method: str, backward: bool):
    """One scan (and its backward) on fixed random inputs, as a no-argument call."""
    gen = torch.Generator().manual_seed(length)
    shapes = {"u": (batch, channels, length), "delta": (batch, channels, length), "A": (channels, state)}
    shapes |= {"B": (batch, state, length), "C": (batch, state, length), "D": (channels,), "bias": (channels,)}
    t = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    t["A"] = -torch.rand(channels, state, generator=gen) * 4 - 0.1  # negative, as -exp(A_log)
    for v in t.values():
        v.requires_grad_(backward)

    def call() -> None:
        y = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["bias"], True, method=method)
        if backward:
            y.sum().backward()

    return call


def network_call(model: str, mixer: str, train: bool):
    """One eager call of `model` built with `mixer`: inference at 224², batch 8, or a training step at 128², batch 8."""
    net = create_model(model, token_mixer=mixer).train(train)
    x = torch.randn(8, 3, 128 if train else 224, 128 if train else 224)
    if not train:
        return lambda: _no_grad(net, x)
    targets = torch.randint(0, net.num_classes, (8,))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), targets).backward()
        optimizer.step()

    return step


def _no_grad(net, x):
    with torch.no_grad():
        return net(x)


def networks(args: argparse.Namespace) -> list[str]:
    lines = [
        "| pass | MambaOut (conv) ms | Mamba block (conv_ssm) ms | MambaOut ÷ Mamba (median) | (best call) |",
        "|---|---|---|---|---|",
    ]
    for train in (False, True):
        paths = [BenchPath(mixer, network_call(args.model, mixer, train)) for mixer in ("conv", "conv_ssm")]
        conv, ssm = measure(paths, args.repeats)
        kind = "training step, 128², batch 8" if train else "inference, 224², batch 8"
        lines.append(
            f"| {kind} | {conv.quantile_ms(0.5):.1f} | {ssm.quantile_ms(0.5):.1f} | "
            f"{conv.quantile_ms(0.5) / ssm.quantile_ms(0.5):.3f} | {min(conv.latencies_s) / min(ssm.latencies_s):.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[196, 3136])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--networks", action="store_true", help="MambaOut against the Mamba block, whole networks")
    parser.add_argument("--model", default="mambaout_femto", help="variant for --networks (mambaout_femto)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    machine = machine_summary()
    title = (
        f"{args.model}: MambaOut against the Mamba block, eager"
        if args.networks
        else f"Selective scan, fused and chunked vs sequential: batch {args.batch}, {args.channels} channels, "
        f"N = {args.state}, fp32"
    )
    lines = [
        f"### {title}",
        "",
        f"- command: `python scripts/scan_bench.py {shlex.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        f"- machine: {machine['cpu']}; torch {machine['torch']}, {machine['threads']} threads; {machine['allocator']}",
        f"- date: {machine['date']}; load average (1/5/15 min) before {machine['load']}",
        f"- {args.repeats} timed calls per path, interleaved; medians",
        "",
    ]
    if args.networks:
        lines += networks(args)
        lines += ["", f"- load average after: {load_average()}"]
        print("\n".join(lines))
        return 0
    lines += [
        "| L | pass | sequential (ms) | chunked (ms) | fused (ms) | chunked × sequential | fused × sequential |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in args.lengths:
        for backward in (False, True):
            paths = [
                BenchPath(method, scan_call(args.batch, args.channels, args.state, length, method, backward))
                for method in ("sequential", "chunked", "fused")
            ]
            seq, chunked, fused = (r.quantile_ms(0.5) for r in measure(paths, args.repeats))
            kind = "forward + backward" if backward else "forward"
            lines.append(
                f"| {length} | {kind} | {seq:.1f} | {chunked:.1f} | {fused:.1f} | {seq / chunked:.2f} | "
                f"{seq / fused:.2f} |"
            )
    lines += ["", f"- load average after: {load_average()}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
