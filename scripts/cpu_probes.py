"""The CPU probes behind BENCHMARKS.md's "allocator" and "what limits it" findings, each rerunnable.

`mambaout bench` compares whole paths; these probes isolate one question each and print a Markdown table. Every
timing is the median of interleaved calls (`mambaout.bench.measure`), in one process unless said otherwise.

  allocator   timm eager vs ours in fresh processes, glibc's default malloc and tuned, taking turns
  profile     self time per operator kind (torch.profiler), timm eager vs ours, profiled in turns
  train-profile  self time per operator of one training step, timm's (fused AdamW) vs ours, profiled in turns
  layernorm   F.layer_norm with and without an affine (PyTorch's CPU kernel is slower without)
  ln-fold     ours as built vs ours with the LayerNorm affine folded into fc1 (the earlier form)
  fc1         fc1 as three oneDNN GEMMs (ours) vs one GEMM plus the GELU pass and conv-input copy it then needs
  dwconv      the 7x7 depthwise conv: oneDNN vs 49 shifted multiply-adds compiled by inductor
  gemm        femto's GEMM shapes through MKL (F.linear) and oneDNN (what `select_kernels` measures)
  contention  timm and ours beside --load busy processes, in fresh processes per thread count / OpenMP wait policy
  engines     ours in PyTorch, ONNX Runtime and OpenVINO over batch and image sizes (behind backend="auto")
  ort-profile ONNX Runtime's own profile of our fused graph: kernel time per operator type (--batch-size 1: batch 1)
  ssm-profile self time per operator of one eager forward of the Mamba-block network (femto, token_mixer conv_ssm)
  cross-scan  the fused scan at femto's stage 1 (batch 8, 4 directions): as the SSM mixer calls it (one copy of the
              map, each direction's order by positions) against the same work read in order (copies laid out ahead)
  pathfinder  samples/s of the Pathfinder generator (mambaout.data.pathfinder) per size and contour length
  dense-memory  peak memory of dense predict's full-size work on one photo (--side: its long side, 4:3), each way in a
              fresh process: torchvision's pasted masks + full-size RLE vs box-local masks (100 detections of a
              random Mask R-CNN), and full-size resized class scores + argmax vs bands of rows (150 classes)
  ceiling     a model's linears and convs alone, each timed on its own at its shape, against the whole network in
              timm, ours and every peer engine: how far any path could get past the best peer with these kernels

Usage: python scripts/cpu_probes.py PROBE [--batch-size N] [--repeats N] [--malloc tuned|system] [--load N]
       [--model NAME] (ceiling, train-profile) [--top N] (train-profile) [--side N] (dense-memory)
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import mambaout
from mambaout.bench import BenchPath, measure
from mambaout.bench.harness import busy_processes
from mambaout.bench.paths import engine_paths, inference_paths, peer_paths, timm_twin, train_paths
from mambaout.data import make_samples
from mambaout.fast import FusedGatedCNNBlock, KernelSet
from mambaout.fast.engines import OnnxRuntimeEngine, OpenVINOEngine, onnx_file
from mambaout.fast.threads import ThreadFitter
from mambaout.layers import selective_scan
from mambaout.layers.ssm import scan_positions

# torch.profiler operator name -> kind
KINDS = {
    "addmm": "GEMM",
    "mm": "GEMM",
    "_linear_pointwise": "GEMM",
    "mkldnn_convolution": "conv",
    "gelu": "GELU",
    "native_layer_norm": "LayerNorm",
    "copy_": "copies",
    "cat": "cat",
    "mul": "mul",
    "mul_": "mul",
    "add": "add",
    "add_": "add",
}


def median_ms(paths: list[BenchPath], repeats: int) -> dict[str, float]:
    return {r.name: r.quantile_ms(0.5) for r in measure(paths, repeats=repeats, warmup=2, iters=1)}


def reference() -> torch.nn.Module:
    """femto with seeded random weights."""
    torch.manual_seed(0)
    return mambaout.create_model("mambaout_femto").eval()


def models(batch_size: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """timm's femto and our PyTorch path (`optimize_for_inference`) with the same random weights, and images."""
    ref = reference()
    ours = mambaout.optimize_for_inference(ref, backend="torch")
    return timm_twin(ref, "mambaout_femto"), ours, torch.randn(batch_size, 3, 224, 224)


def allocator(args: argparse.Namespace) -> None:
    print("| allocator | timm eager img/s | ours img/s | ours / timm |\n|---|---|---|---|")
    for _ in range(args.pairs):
        for mode in ("system", "tuned"):
            child = [sys.executable, __file__, "_pair", "--malloc", mode, "--batch-size", str(args.batch_size)]
            child += ["--repeats", str(args.repeats)]
            print(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


def _pair(args: argparse.Namespace) -> None:
    baseline, ours, x = models(args.batch_size)
    with torch.inference_mode():
        ms = median_ms([BenchPath("timm", lambda: baseline(x)), BenchPath("ours", lambda: ours(x))], args.repeats)
    ips = {k: args.batch_size / v * 1e3 for k, v in ms.items()}
    print(
        f"| {mambaout.fast.cpu_allocator()} | {ips['timm']:.2f} | {ips['ours']:.2f} | {ips['ours'] / ips['timm']:.2f} |"
    )


def profile_kinds(args: argparse.Namespace) -> None:
    baseline, ours, x = models(args.batch_size)
    paths = [("timm eager", baseline), ("ours", ours)]
    table = {name: defaultdict(float) for name, _ in paths}
    with torch.inference_mode():
        for _, model in paths:
            model(x)
        for r in range(args.repeats):  # one profiled call per path per round, in turns, so load falls on both alike
            for name, model in paths[r % 2 :] + paths[: r % 2]:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model(x)
                for event in prof.key_averages():
                    kind = KINDS.get(event.key.split("::")[-1], "other")
                    table[name][kind] += event.self_cpu_time_total / 1e3 / args.repeats
    print(f"ms per forward, femto batch {args.batch_size}, {mambaout.fast.cpu_allocator()}\n")
    print("| kind | timm eager | ours |\n|---|---|---|")
    total = {name: sum(kinds.values()) for name, kinds in table.items()}
    for kind in sorted(set(KINDS.values()) | {"other"}, key=lambda k: -table["timm eager"][k]):
        cells = [f"{table[n][kind]:.0f} ({100 * table[n][kind] / total[n]:.0f}%)" for n in table]
        print(f"| {kind} | {' | '.join(cells)} |")
    print(f"| whole forward | {total['timm eager']:.0f} | {total['ours']:.0f} |")


def train_profile(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    ref = mambaout.create_model(args.model)
    x = torch.randn(args.batch_size, 3, 224, 224)
    paths = train_paths(ref, args.model, x, torch.float32, micro_batch=None)
    table = {p.name: defaultdict(float) for p in paths}
    for p in paths:
        p.run()
    for r in range(args.repeats):  # one profiled step per path per round, in turns, so load falls on both alike
        for p in paths[r % 2 :] + paths[: r % 2]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                p.run()
            for event in prof.key_averages():
                if event.self_cpu_time_total > 0:
                    table[p.name][event.key] += event.self_cpu_time_total / 1e3 / args.repeats
    names = list(table)
    total = {n: sum(ops.values()) for n, ops in table.items()}
    top = sorted(set().union(*table.values()), key=lambda op: -max(table[n][op] for n in names))[: args.top]
    print(f"{args.model} training step, batch {args.batch_size}, 224², {torch.get_num_threads()} threads; ")
    print(f"self CPU ms per step by operator (torch.profiler, {args.repeats} steps each, in turns)\n")
    print(f"| operator | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for op in top:
        print(f"| {op} | {' | '.join(f'{table[n][op]:.0f} ({100 * table[n][op] / total[n]:.0f}%)' for n in names)} |")
    rest = {n: total[n] - sum(table[n][op] for op in top) for n in names}
    print(f"| everything else | {' | '.join(f'{rest[n]:.0f}' for n in names)} |")
    print(f"| whole step | {' | '.join(f'{total[n]:.0f}' for n in names)} |")


def layernorm(args: argparse.Namespace) -> None:
    print("| input | no affine (ms) | affine (ms) |\n|---|---|---|")
    with torch.inference_mode():
        for rows, dim in ((21952, 48), (11760, 96), (6076, 192), (1568, 288)):
            x, w, b = torch.randn(rows, dim), torch.ones(dim), torch.zeros(dim)
            ms = median_ms(
                [
                    BenchPath("plain", lambda x=x, d=dim: F.layer_norm(x, (d,), eps=1e-6)),
                    BenchPath("affine", lambda x=x, d=dim, w=w, b=b: F.layer_norm(x, (d,), w, b, 1e-6)),
                ],
                args.repeats,
            )
            print(f"| [{rows}, {dim}] | {ms['plain']:.3f} | {ms['affine']:.3f} |")


def _fold_layernorm(fast: torch.nn.Module) -> torch.nn.Module:
    """A copy of `fast` whose blocks fold the LayerNorm affine into fc1's three linears and normalize without one."""
    folded = copy.deepcopy(fast)
    for block in folded.modules():
        if isinstance(block, FusedGatedCNNBlock):
            gamma, beta = block.norm_weight.double(), block.norm_bias.double()
            for name in ("gate", "ident", "conv_in"):
                weight = getattr(block, f"{name}_weight").double()
                getattr(block, f"{name}_bias").copy_(getattr(block, f"{name}_bias").double() + weight @ beta)
                getattr(block, f"{name}_weight").copy_(weight * gamma)
            block.norm_weight, block.norm_bias = None, None
    return folded


def ln_fold(args: argparse.Namespace) -> None:
    _, ours, x = models(args.batch_size)
    folded = _fold_layernorm(ours)
    with torch.inference_mode():
        diff = (ours(x) - folded(x)).abs().max().item()
        ms = median_ms([BenchPath("kept", lambda: ours(x)), BenchPath("folded", lambda: folded(x))], args.repeats)
    print(f"femto batch {args.batch_size}, {mambaout.fast.cpu_allocator()}; max abs logit difference {diff:.1e}\n")
    print("| LayerNorm affine | img/s |\n|---|---|")
    for name, v in ms.items():
        print(f"| {name} | {args.batch_size / v * 1e3:.2f} |")


def fc1(args: argparse.Namespace) -> None:
    linear = torch.ops.mkldnn._linear_pointwise
    print("| input | three GEMMs (ms) | one GEMM (ms) | one GEMM + GELU + conv copy (ms) |\n|---|---|---|---|")
    with torch.inference_mode():
        for rows, dim, hidden, ident in ((18816, 48, 128, 80), (8624, 96, 256, 160)):
            x = torch.randn(rows, dim)
            ws = [torch.randn(n, dim) for n in (hidden, ident, dim)]
            bs = [torch.randn(n) for n in (hidden, ident, dim)]
            w, b = torch.cat(ws), torch.cat(bs)

            def three(x=x, ws=ws, bs=bs):
                return linear(x, ws[0], bs[0], "gelu", [], "none"), *(
                    linear(x, ws[k], bs[k], "none", [], "") for k in (1, 2)
                )

            def one_and_passes(x=x, w=w, b=b, hidden=hidden, ident=ident):
                y = linear(x, w, b, "none", [], "")
                return F.gelu(y[:, :hidden]), y[:, hidden + ident :].contiguous()

            ms = median_ms(
                [
                    BenchPath("three", three),
                    BenchPath("one", lambda x=x, w=w, b=b: linear(x, w, b, "none", [], "")),
                    BenchPath("one+", one_and_passes),
                ],
                args.repeats,
            )
            print(f"| [{rows}, {dim}] | {ms['three']:.2f} | {ms['one']:.2f} | {ms['one+']:.2f} |")


def _taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """7x7 depthwise conv of `[B, H, W, C]` by `[7, 7, C]` taps as 49 shifted multiply-adds."""
    height, width = x.shape[1:3]
    padded = F.pad(x, (0, 0, 3, 3, 3, 3))
    out = bias.expand_as(x)
    for i in range(7):
        for j in range(7):
            out = out + padded[:, i : i + height, j : j + width] * weight[i, j]
    return out


def dwconv(args: argparse.Namespace) -> None:
    compiled = torch.compile(_taps, dynamic=False)
    print("| input [B, C, H, W] | oneDNN (ms, GFLOP/s) | inductor taps (ms, GFLOP/s) |\n|---|---|---|")
    with torch.inference_mode():
        for batch, ch, size in ((1, 48, 56), (1, 192, 14), (7, 48, 56), (15, 96, 28), (31, 192, 14), (32, 288, 7)):
            nhwc, weight, bias = torch.randn(batch, size, size, ch), torch.randn(ch, 1, 7, 7), torch.randn(ch)
            nchw, taps = nhwc.permute(0, 3, 1, 2), weight[:, 0].permute(1, 2, 0).contiguous()  # channels-last view
            torch.testing.assert_close(
                compiled(nhwc, taps, bias), F.conv2d(nchw, weight, bias, padding=3, groups=ch).permute(0, 2, 3, 1)
            )
            ms = median_ms(
                [
                    BenchPath("onednn", lambda a=nchw, w=weight, b=bias, c=ch: F.conv2d(a, w, b, padding=3, groups=c)),
                    BenchPath("taps", lambda a=nhwc, w=taps, b=bias: compiled(a, w, b)),
                ],
                args.repeats,
            )
            gflop = 2 * batch * ch * size * size * 49 / 1e6
            cells = [f"{ms[k]:.3f}, {gflop / ms[k]:.1f}" for k in ("onednn", "taps")]
            print(f"| [{batch}, {ch}, {size}, {size}] | {' | '.join(cells)} |")


def gemm(args: argparse.Namespace) -> None:
    print(f"{torch.get_num_threads()} threads\n")
    print("| [N, K] x [K, M] | MKL (GFLOP/s) | oneDNN (GFLOP/s) | oneDNN / MKL |\n|---|---|---|---|")
    plain, onednn = KernelSet(), KernelSet(onednn=True, min_rows=0)
    shapes = ((49, 288, 576), (196, 192, 384), (784, 96, 256), (3136, 48, 128), (6272, 192, 384), (21952, 48, 128))
    with torch.inference_mode():
        for rows, k, m in (*shapes, (2048, 2048, 2048)):
            x, w, b = torch.randn(rows, k), torch.randn(m, k), torch.randn(m)
            ms = median_ms(
                [
                    BenchPath("mkl", lambda x=x, w=w, b=b: plain.linear(x, w, b)),
                    BenchPath("onednn", lambda x=x, w=w, b=b: onednn.linear(x, w, b)),
                ],
                args.repeats,
            )
            gflop = 2 * rows * k * m / 1e6
            print(f"| [{rows}, {k}] x [{k}, {m}] | {gflop / ms['mkl']:.1f} | {gflop / ms['onednn']:.1f} | "
                  f"{ms['mkl'] / ms['onednn']:.2f} |")  # fmt: skip


# (threads, OMP_WAIT_POLICY or None for libgomp's default) per fresh process of the contention probe
CONTENTION_VARIANTS = ((2, None), (2, "PASSIVE"), (1, None))


def contention(args: argparse.Namespace) -> None:
    print(f"femto, {args.load} busy process(es) beside each run; medians (best call) in img/s\n")
    print("| threads | OMP_WAIT_POLICY | batch | timm eager | ours, fixed threads | ours, fitted | fitted / timm |")
    print("|---|---|---|---|---|---|---|")
    with busy_processes(args.load):
        for threads, policy in CONTENTION_VARIANTS:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            for batch in (32, 1):
                child = [sys.executable, __file__, "_contend", "--batch-size", str(batch), "--threads", str(threads)]
                child += ["--repeats", str(args.repeats if batch > 1 else 4 * args.repeats)]
                row = subprocess.run(child, check=True, capture_output=True, text=True, env=env).stdout.strip()
                print(f"| {threads} | {policy or 'default'} | {batch} | {row} |", flush=True)


def _contend(args: argparse.Namespace) -> None:
    baseline, fitted, x = models(args.batch_size)
    fixed = mambaout.optimize_for_inference(reference(), backend="torch")
    fixed.threads = ThreadFitter(fit=False)
    paths = [BenchPath(name, lambda m=m: m(x)) for name, m in (("timm", baseline), ("fixed", fixed), ("fit", fitted))]
    with torch.inference_mode():
        results = {r.name: r for r in measure(paths, repeats=args.repeats, warmup=2, iters=1)}
    batch = args.batch_size
    cells = [f"{r.images_per_s(batch):.1f} ({r.best_images_per_s(batch):.1f})" for r in results.values()]
    ratio = results["fit"].images_per_s(batch) / results["timm"].images_per_s(batch)
    print(" | ".join([*cells, f"{ratio:.2f}"]))


def engines(args: argparse.Namespace) -> None:
    ref = reference()
    ours = mambaout.optimize_for_inference(ref, backend="torch")
    path, threads = onnx_file(ref), torch.get_num_threads()
    ort, ov = OnnxRuntimeEngine(path, threads), OpenVINOEngine(path, threads, hint="LATENCY")
    ov_tp = OpenVINOEngine(path, threads, hint="THROUGHPUT")
    print(f"femto, {threads} threads, our fused graph in each; best call in ms (median)\n")
    print("| image | batch | pixels/call | PyTorch | ONNX Runtime | OpenVINO latency | OpenVINO throughput | fastest |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for size in (64, 128, 224):
            for batch in (1, 2, 4, 8, 16, 32):
                x = torch.randn(batch, 3, size, size)
                a = x.numpy()
                runs = [("PyTorch", lambda x=x: ours(x)), ("ONNX Runtime", lambda a=a: ort.run(a))]
                runs += [("OpenVINO latency", lambda a=a: ov.run(a)), ("OpenVINO throughput", lambda a=a: ov_tp.run(a))]
                repeats = max(args.repeats, min(30, 3_000_000 // (batch * size * size)))
                results = measure([BenchPath(n, f) for n, f in runs], repeats=repeats, warmup=2, iters=1)
                cells = [f"{1e3 * min(r.latencies_s):.2f} ({r.quantile_ms(0.5):.2f})" for r in results]
                fastest = min(results, key=lambda r: min(r.latencies_s)).name
                print(f"| {size} | {batch} | {batch * size * size} | {' | '.join(cells)} | {fastest} |", flush=True)


def ort_profile(args: argparse.Namespace) -> None:
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = "/tmp/mambaout-ort-profile"
    session = ort.InferenceSession(str(onnx_file(reference())), options, providers=["CPUExecutionProvider"])
    x = torch.randn(args.batch_size, 3, 224, 224).numpy()
    for _ in range(2 + args.repeats):  # the first two calls are left out as warm-up (below)
        session.run(None, {session.get_inputs()[0].name: x})
    written = Path(session.end_profiling())
    events = json.loads(written.read_text())
    written.unlink()
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[2]["ts"] if len(runs) > 2 else 0
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    print(f"femto, batch {args.batch_size}, 224², {torch.get_num_threads()} threads, our fused graph in ONNX Runtime;")
    per_call = total / 1e3 / args.repeats
    print(f"kernel time over {args.repeats} calls after 2 warm-up calls: {per_call:.1f} ms per call\n")
    print("| operator | share | ms per call |\n|---|---|---|")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {100 * us / total:.1f}% | {us / 1e3 / args.repeats:.2f} |")


def _layer_calls(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Size]]:
    """Every `nn.Linear` and `nn.Conv2d` call of one forward of `model` on `x`, with its input's shape."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, inputs, _: calls.append((m, inputs[0].shape)))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return calls


def _best_ms(fn, repeats: int) -> float:
    return 1e3 * min(measure([BenchPath("op", fn)], repeats=repeats, warmup=2, iters=1)[0].latencies_s)


LINEARS = "linears (best of MKL and oneDNN per shape)"


def ceiling(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    ref = mambaout.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    plain, onednn = KernelSet(), KernelSet(onednn=True, min_rows=0)
    floor = defaultdict(float)  # kind -> ms, each op its fastest call alone (warm cache, no other op between)
    macs = 0
    with torch.inference_mode():
        for module, shape in _layer_calls(ref, x):
            a = torch.randn(shape)
            if isinstance(module, torch.nn.Linear):
                a, w, b = a.reshape(-1, shape[-1]), module.weight, module.bias
                macs += a.shape[0] * w.numel()
                mkl = _best_ms(lambda a=a, w=w, b=b: plain.linear(a, w, b), args.repeats)
                dnn = _best_ms(lambda a=a, w=w, b=b: onednn.linear(a, w, b), args.repeats)
                floor[LINEARS] += min(mkl, dnn)
            else:
                a = a.contiguous(memory_format=torch.channels_last)
                w = module.weight.contiguous(memory_format=torch.channels_last)
                kind = "depthwise convs" if module.groups > 1 else "stem and downsampling convs"
                floor[kind] += _best_ms(lambda m=module, a=a, w=w: m._conv_forward(a, w, m.bias), args.repeats)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        paths = inference_paths(ref, args.model, x, torch.float32, False, None, timm_compiled=True)
        paths += peer_paths(ref, args.model, x, threads, Path(folder)) + engine_paths(ref, x, threads, Path(folder))
        with torch.inference_mode():  # single images: 5 calls in a row, so engines' spinning pools settle
            results = measure(paths, repeats=args.repeats, warmup=2, iters=5 if args.batch_size == 1 else 1)
    total = sum(floor.values())
    print(f"{args.model}, batch {args.batch_size}, 224², {threads} threads; fastest call in ms\n")
    print("| what | ms | linears + convs / this |\n|---|---|---|")
    for kind, ms in floor.items():
        rate = f" ({2 * macs / ms / 1e6:.0f} GFLOP/s)" if kind == LINEARS else ""
        print(f"| {kind}{rate} | {ms:.2f} | |")
    print(f"| **linears + convs alone** | {total:.2f} | 1.00 |")
    for r in sorted(results, key=lambda r: min(r.latencies_s)):
        best = 1e3 * min(r.latencies_s)
        print(f"| {r.name} (whole network; median {r.quantile_ms(0.5):.2f}) | {best:.2f} | {total / best:.2f} |")
    best_peer = min((r for r in results if r.peer), key=lambda r: min(r.latencies_s))
    print(
        f"\nWith every other operator free and these GEMM and conv kernels, a path would run at most "
        f"{1e3 * min(best_peer.latencies_s) / total:.2f}x the best peer ({best_peer.name}) by best call."
    )


def ssm_profile(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = mambaout.create_model(args.model, token_mixer="conv_ssm").eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    ops = defaultdict(float)
    with torch.no_grad():
        model(x)
        for _ in range(args.repeats):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
            for event in prof.key_averages():
                ops[event.key] += event.self_cpu_time_total / 1e3 / args.repeats
    total = sum(ops.values())
    print(f"{args.model}, token_mixer conv_ssm, batch {args.batch_size}, 224², {torch.get_num_threads()} threads; ")
    print(f"self CPU ms per eager forward by operator (torch.profiler, {args.repeats} forwards)\n")
    print("| operator | ms | share |\n|---|---|---|")
    for op in sorted(ops, key=lambda k: -ops[k])[: args.top]:
        print(f"| {op} | {ops[op]:.0f} | {100 * ops[op] / total:.0f}% |")
    print(f"| whole forward | {total:.0f} | |")


def cross_scan(args: argparse.Namespace) -> None:
    batch, channels, directions, state, side = args.batch_size, 48, 4, 16, 56
    length = side * side
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, length, channels, generator=gen)  # the map, channels-last: [B, L, C]
    bc = torch.randn(batch, length, directions, 2 * state, generator=gen).permute(0, 2, 3, 1)  # [B, K, 2N, L]
    delta = torch.randn(batch, directions * channels, length, generator=gen) * 0.5
    A = -torch.rand(directions * channels, state, generator=gen) * 4
    D, bias = torch.randn(directions * channels, generator=gen), torch.randn(directions * channels, generator=gen)
    B, C = bc.split(state, dim=2)
    laid_out = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (B, C)]
    as_called = (tokens.transpose(1, 2), B, C, scan_positions(side, side, directions, torch.device("cpu")))
    in_order = (tokens.transpose(1, 2).contiguous(), *laid_out, None)

    def call(u, B, C, positions):
        def run() -> None:
            with torch.no_grad():
                selective_scan(u, delta, A, B, C, D, bias, True, positions=positions)

        return run

    paths = [BenchPath("as the SSM mixer calls it", call(*as_called)), BenchPath("read in order", call(*in_order))]
    times = median_ms(paths, args.repeats)
    print(f"fused scan, batch {batch}, {directions}×{channels} channels, L = {length}, N = {state}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved calls\n")  # fmt: skip
    print("| inputs | ms |\n|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} |")


def pathfinder_speed(args: argparse.Namespace) -> None:
    """Samples per second of the Pathfinder generator, one process, per size and contour length."""
    print("| size | contour length | samples | samples/s |\n|---|---|---|---|")
    for size, length, count in ((32, 6, 1000), (32, 9, 1000), (32, 14, 1000), (64, 14, 200), (128, 14, 50)):
        start = time.perf_counter()
        for _ in make_samples(size, length, count, seed=0):
            pass
        print(f"| {size} | {length} | {count} | {count / (time.perf_counter() - start):.0f} |")


_DENSE_PEAK = """
import json, resource, sys
import torch, torch.nn.functional as F
from mambaout.dense import create_detector
from mambaout.dense.data import encode_mask
from mambaout.dense.inference import _detect, _label_bands, _mask_crops, _rle
from mambaout.dense.tasks import coco_results

method, height, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
image = torch.rand(3, height, width)
if method.startswith("detect"):
    tiny = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
    model = create_detector("mambaout_femto", 2, model_kwargs=tiny, fpn_channels=16, box_head_dim=32).eval()
    heads = model.roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.0, 1.0, 100
else:
    scores = torch.randn(150, 512, 512 * width // height)  # UperNet's output at the ADE scale's short side 512
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    if method == "detect-torchvision":  # the full-size pasted masks, each encoded whole
        count = len(coco_results(model([image])[0], 0, [1, 2]))
    elif method == "detect-ours":
        output = _detect(model, image)
        crops = _mask_crops(output["masks"], output["boxes"], height, width)
        count = len([_rle(c.numpy(), left, top, height, width) for c, left, top in crops])
    elif method == "segment-full":
        resized = F.interpolate(scores[None], (height, width), mode="bilinear", align_corners=False)[0]
        count = int(resized.argmax(0).max())
    else:
        count = max(int(band.max()) for _, band in _label_bands(scores, height, width))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (peak - before) / 1024, "count": count}))
"""


def dense_memory(args: argparse.Namespace) -> None:
    """Peak resident memory added by each way of dense predict's full-size work, one fresh process each."""
    height, width = args.side * 3 // 4, args.side
    print(f"one {width}x{height} photo ({width * height / 1e6:.1f} MP), 1 thread; peak RSS added by the step\n")
    print("| task | torchvision's way (baseline) | ours | ours / baseline |\n|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for task, baseline, ours in (("detect", "detect-torchvision", "detect-ours"),
                                 ("segment", "segment-full", "segment-ours")):  # fmt: skip
        mib, counts = {}, set()
        for method in (baseline, ours):
            run = [sys.executable, "-c", _DENSE_PEAK, method, str(height), str(width)]
            done = subprocess.run(run, capture_output=True, text=True, check=True, env=env)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            mib[method] = measured["extra_mib"]
            counts.add(measured["count"])
        # detect: masks encoded (100 unless the random detector found fewer); segment: the largest label drawn
        what = f"{task} ({'masks' if task == 'detect' else 'top label'} {' / '.join(map(str, sorted(counts)))})"
        print(f"| {what} | {mib[baseline]:.0f} MiB | {mib[ours]:.0f} MiB | {mib[ours] / mib[baseline]:.3f} |")


PROBES = {
    "allocator": allocator,
    "_pair": _pair,
    "profile": profile_kinds,
    "train-profile": train_profile,
    "layernorm": layernorm,
    "ln-fold": ln_fold,
    "fc1": fc1,
    "dwconv": dwconv,
    "gemm": gemm,
    "contention": contention,
    "_contend": _contend,
    "engines": engines,
    "ort-profile": ort_profile,
    "ceiling": ceiling,
    "ssm-profile": ssm_profile,
    "cross-scan": cross_scan,
    "pathfinder": pathfinder_speed,
    "dense-memory": dense_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=list(PROBES))
    parser.add_argument("--batch-size", type=int, default=32, help="images per call (32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path (5)")
    parser.add_argument("--pairs", type=int, default=3, help="allocator: process pairs (3)")
    parser.add_argument("--malloc", choices=mambaout.fast.allocator.MALLOC_MODES, default="tuned")
    parser.add_argument("--load", type=int, default=1, help="contention: busy processes beside the runs (1)")
    parser.add_argument("--model", default="mambaout_femto", help="ceiling, train-profile, ssm-profile: variant")
    parser.add_argument("--top", type=int, default=20, help="train-profile, ssm-profile: operators listed (20)")
    parser.add_argument("--side", type=int, default=4000, help="dense-memory: the photo's long side (4000: 12 MP)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    args = parser.parse_args()
    if args.malloc == "tuned":
        mambaout.tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    PROBES[args.probe](args)


if __name__ == "__main__":
    main()
