"""Writers for ONNX, TorchScript and ExportedProgram files, each checked after writing by running what was written.

Every file takes a dynamic batch; ONNX and TorchScript also take any image size, the ExportedProgram (and the
`torch.export`-based ONNX) any multiple of 32 (`torch.export` needs the size expressed as a multiple of a symbol)
from the smallest at which the last stage's map is 2×2 (64 px at the usual stride 32): `torch.export` takes every
dynamic size to be 2 or more. A side traced at 32 px is fixed in the file instead. After writing, the file
is loaded back (ONNX through ONNX Runtime) and run on fresh random inputs of a batch size and image size other than
the ones it was traced with (the same side where it is fixed); its outputs must match the PyTorch model's to `atol`.
The output is written atomically: a failed export or verification leaves an existing file as it was.

Models with other token mixers export as well (fused, their mixer kept as a module), except the SSM mixer to ONNX:
its selective scan is a custom op (`mambaout::selective_scan_fused`, or `..._chunked` where the kernel cannot be
built), which TorchScript and ExportedProgram files call (so load them in a process that imported mambaout) and ONNX
has no operator for.

The module written may be another graph of the same function (`graph`): `mambaout export` and the inference engines
write `mambaout.fast.fused_graph(model)` (folded LayerScale, no split/cat copies), which ONNX Runtime runs 1.2-1.3×
faster at batch 16 than the reference graph; the file is still verified against the reference model.
"""

import copy
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mambaout.errors import UserError
from mambaout.layers import SSMMixer
from mambaout.weights.io import atomic_path
from mambaout.weights.loading import first_nonfinite

__all__ = ["FORMATS", "ExportReport", "export_model", "load_exported", "verify_exported"]

FORMATS = ("onnx", "torchscript", "exported-program")
SIZE_MULTIPLE = 32  # the network's total stride; ExportedProgram sizes are multiples of it
ONNX_OPSET = 18


@dataclass
class ExportReport:
    """What was written and how well it reproduced the model.

    Attributes:
        path: The file written.
        format: One of `FORMATS`.
        checks: (input shape, max |difference|) per verification input.
        dynamic: Which input dims are dynamic ("batch", "height", "width").
    """

    path: Path
    format: str
    checks: list[tuple[tuple[int, ...], float]] = field(default_factory=list)
    dynamic: tuple[str, ...] = ()

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d in self.checks), default=float("nan"))


def smallest_dynamic_side(model: nn.Module) -> int:
    """The smallest image side (a multiple of 32) that a `torch.export` program with dynamic image sides takes.

    `torch.export` takes every dynamic size to be at least 2 (it specialises sizes 0 and 1, where a map of 1 would
    broadcast) and guards the program with it, so the side must give the last stage a map of 2 or more: twice the
    network's total stride, its last stage's `reduction` (32 for MambaOut's four stages, less with a smaller stem
    stride or fewer stages).
    """
    reduction = max((info["reduction"] for info in getattr(model, "feature_info", ())), default=SIZE_MULTIPLE)
    return SIZE_MULTIPLE * max(1, math.ceil(2 * reduction / SIZE_MULTIPLE))


@dataclass(frozen=True)
class _ExportShapes:
    """torch.export's dynamic dims for an example of `img_size`, what they are called, and a second size in them.

    The batch is dynamic. An image side is any multiple of 32 from `smallest` when the example's side is at least 64
    and `smallest`; a smaller one is fixed: `torch.export` makes a constant of a symbol traced at 1 (32 px as 32 × 1)
    and cannot keep a side dynamic whose last map it traced at 1×1.
    """

    img_size: tuple[int, int]
    smallest: int

    def _dynamic(self, side: int) -> bool:
        return side >= max(self.smallest, 2 * SIZE_MULTIPLE)

    @property
    def dims(self) -> dict[str, dict[int, object]]:
        dims: dict[int, object] = {0: torch.export.Dim("batch", min=1, max=4096)}
        for axis, name, side in ((2, "height", self.img_size[0]), (3, "width", self.img_size[1])):
            if self._dynamic(side):
                dims[axis] = SIZE_MULTIPLE * torch.export.Dim(name, min=self.smallest // SIZE_MULTIPLE, max=4096)
        return {"x": dims}

    @property
    def names(self) -> tuple[str, ...]:
        start = "" if self.smallest == SIZE_MULTIPLE else f" from {self.smallest}"
        sides = [n for n, side in zip(("height", "width"), self.img_size, strict=True) if self._dynamic(side)]
        return ("batch", *(f"{n} (x{SIZE_MULTIPLE}{start})" for n in sides))

    @property
    def other(self) -> tuple[int, int]:
        """A second image size the program takes: each dynamic side moved by 32, within its range."""
        height, width = self.img_size
        if self._dynamic(height):
            height += SIZE_MULTIPLE
        if self._dynamic(width):
            width = max(self.smallest, width - SIZE_MULTIPLE)
        return height, width


def _write_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, dynamo: bool, shapes: _ExportShapes
) -> tuple[str, ...]:
    if dynamo:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=shapes.dims, opset_version=ONNX_OPSET, verbose=False,
        )  # fmt: skip
        program.save(str(path))
        return shapes.names
    # the TorchScript-based exporter: 25x faster to run and takes any image size, not only multiples of 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )  # fmt: skip
    return ("batch", "height", "width")


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[str, ...]:
    # tracing records shape-generic tensor ops: the network has no data- or shape-dependent Python branches.
    # TorchScript is deprecated in recent PyTorch but still what many C++ and mobile runtimes load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        traced = torch.jit.trace(model, example, check_trace=False)
        # into memory first: torch.jit.save's C++ writer aborts the process when a write to a file fails (disk full)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    path.write_bytes(buffer.getbuffer())
    return ("batch", "height", "width")


def _write_exported_program(
    model: nn.Module, example: torch.Tensor, path: Path, shapes: _ExportShapes
) -> tuple[str, ...]:
    program = torch.export.export(model, (example,), dynamic_shapes=shapes.dims, strict=False)
    buffer = io.BytesIO()  # as for TorchScript: a failed write raises here instead of aborting the process
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getbuffer())
    return shapes.names


def load_exported(path: str | os.PathLike, fmt: str):
    """Load an exported file as a callable `images [B, 3, H, W] -> logits` (ONNX: an ONNX Runtime session)."""
    path = str(path)
    if fmt == "onnx":
        import numpy as np
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(session.run(None, {name: x.detach().cpu().numpy()})[0]))

        return run
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").eval()
    if fmt == "exported-program":
        return torch.export.load(path).module()
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def verify_exported(
    model: nn.Module, path: Path, fmt: str, shapes: list[tuple[int, int, int, int]], atol: float = 1e-4
) -> list[tuple[tuple[int, ...], float]]:
    """Run the file and the model on fresh random inputs of each shape; a `UserError` if any differs by > `atol`.

    Returns:
        (shape, max |difference|) per shape.
    """
    exported = load_exported(path, fmt)
    gen = torch.Generator().manual_seed(1234)
    checks = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.inference_mode():
            want = model(x)
            got = exported(x)
        diff = (got.float() - want.float()).abs().max().item()
        checks.append((tuple(shape), diff))
        if not diff <= atol:
            raise UserError(
                f"the exported {fmt} file differs from PyTorch by {diff:.3g} (more than --atol {atol:g}) on input "
                f"{list(shape)}, so it was not kept: a larger --atol accepts it"
            )
    return checks


def export_model(
    model: nn.Module,
    fmt: str,
    output: str | os.PathLike,
    img_size: tuple[int, int] = (224, 224),
    verify: bool = True,
    atol: float = 1e-4,
    onnx_dynamo: bool = False,
    graph: nn.Module | None = None,
) -> ExportReport:
    """Export `model` (fp32, CPU, eval mode) to `output` in format `fmt`, then verify the file.

    Args:
        model: A `MambaOut` (or any images -> logits module built from the same layers).
        fmt: One of `FORMATS`.
        output: File to write (atomically; parents are created).
        img_size: (H, W) of the example input used for tracing.
        verify: Load the file back and compare it with the model on fresh inputs (batch 1 and 3, the traced size
            and a second size).
        atol: Largest max |difference| the verification accepts.
        onnx_dynamo: Use the `torch.export`-based ONNX exporter (image sizes then multiples of 32, as for an
            ExportedProgram).
        graph: The module written to the file, computing the same function as `model` (e.g.
            `mambaout.fast.fused_graph(model)`: fewer and cheaper ops); default `model` itself. The file is verified
            against `model`.

    Returns:
        An `ExportReport`.

    Raises:
        UserError: Unknown format, a size the format cannot take, weights that are not finite (nothing could be
            verified), or a written file that does not reproduce the model (it is not kept).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and any(isinstance(m, SSMMixer) for m in model.modules()):
        raise UserError(
            "--format onnx: the selective-scan (SSM) token mixer has no ONNX operator; export it as torchscript or "
            "exported-program (they call mambaout's selective-scan op: load them with mambaout imported)"
        )
    multiple_only = fmt == "exported-program" or (fmt == "onnx" and onnx_dynamo)
    if multiple_only and (img_size[0] % SIZE_MULTIPLE or img_size[1] % SIZE_MULTIPLE):
        raise UserError(f"--img-size {img_size[0]}x{img_size[1]}: {fmt} needs multiples of {SIZE_MULTIPLE}")
    if fmt == "exported-program" and Path(output).suffix != ".pt2":
        raise UserError(f"--output {output}: an ExportedProgram file must end in .pt2 (torch.export.load needs it)")
    bad = first_nonfinite(model.state_dict())
    if verify and bad is not None:
        raise UserError(
            f"the weights hold NaN or inf (first in '{bad}'): the model's own outputs are not finite, so no export of "
            "it can be verified; fix the checkpoint (or pass --no-verify to write it anyway)"
        )
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device and mode
    example = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(0))
    output = Path(output)
    shapes = _ExportShapes(img_size, smallest_dynamic_side(model))
    other = shapes.other
    if not multiple_only:  # sizes that are no multiple of the stride must work too
        other = (img_size[0] + SIZE_MULTIPLE + 8, max(SIZE_MULTIPLE, img_size[1] - SIZE_MULTIPLE) + 8)
    # files keep the default weight layout (torch.export's packaging expects it); channels-last is a runtime choice
    graph = model if graph is None else copy.deepcopy(graph).float().cpu().eval()
    graph = graph.to(memory_format=torch.contiguous_format)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        if fmt == "onnx":
            dynamic = _write_onnx(graph, example, tmp, onnx_dynamo, shapes)
        elif fmt == "torchscript":
            dynamic = _write_torchscript(graph, example, tmp)
        else:
            dynamic = _write_exported_program(graph, example, tmp, shapes)
        checks = verify_exported(model, tmp, fmt, [(1, 3, *img_size), (3, 3, *other)], atol) if verify else []
    return ExportReport(output, fmt, checks, dynamic)
