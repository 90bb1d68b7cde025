"""Effective receptive fields (ERF): how far each token mixer lets a stage's centre token see.

The ERF of RepLKNet (Ding et al., CVPR 2022) and VMamba (Liu et al., NeurIPS 2024): the gradient of a stage's centre
output token with respect to the network's input. Here, for a stage K (1-4) with an output map y of H×W tokens and its
centre token (H//2, W//2):

    s = Σ_images Σ_channels ReLU(y[image, H//2, W//2, channel])
    map = Σ_images Σ_channels |∂s/∂x|, divided by its sum (so the map sums to 1)

with the model in eval mode and everything in float32. `wrt="input"` takes x to be the normalised images (the classic
input-image ERF, in input pixels); `wrt="tokens"` takes x to be the stage's own input tokens (the output of its
downsampling, the input of its first block) and y − x for y, so that the map holds the mixing of the stage's blocks
alone, without the skip connection (which adds its whole gradient to the centre token). The ReLU is RepLKNet's and
VMamba's: a plain sum over channels of a LayerNorm's output (the stem and every downsampling end in one) is constant
while the norm's scale is uniform, as at initialisation, so its gradient through them would vanish. Each image's
gradient is its own (nothing mixes images in eval mode), so its absolute value is taken before images are summed;
RepLKNet and VMamba take the gradient's ReLU instead, and rank areas on log10(map + 1), which depends on the
gradients' scale: here the radii come from the linear map and only the picture is logarithmic (log10 of each pixel's
share over the peak's).

radius_p is the radius, in pixels of the map (input pixels or tokens), of the smallest disc around the centre that
holds a share p of the mass (a pixel is inside when its centre is). The centre is the centre token for `wrt="tokens"`,
and for `wrt="input"` the input pixel under it, stride·(H//2, W//2): the stride-2, 3×3, padding-1 convolutions of the
stem and downsampling centre token i of a stage with stride s on pixel s·i.
"""

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from PIL import Image

from mambaout.data import UnreadableImage, data_config, eval_transform, list_images, load_image, to_rgb
from mambaout.errors import UserError
from mambaout.layers import TOKEN_MIXERS
from mambaout.models import MambaOut
from mambaout.models.settings import create_configured_model
from mambaout.outputs import OUTPUT_KINDS, PNG_SOFTWARE, check_output
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.distributed import resolve_device
from mambaout.train.inference import load_classifier
from mambaout.weights.io import atomic_write

__all__ = [
    "DEFAULT_ERF_MIXERS",
    "ERF_PHOTOS",
    "ErfMap",
    "ErfSettings",
    "centre_of",
    "effective_receptive_field",
    "erf_images",
    "erf_table",
    "mass_radii",
    "plot_erf",
    "run_erf",
    "token_side",
]

DEFAULT_ERF_MIXERS = ("conv", "conv_ssm", "attention")
DEFAULT_MODEL = "mambaout_femto"
DEFAULT_IMG_SIZE = 224
# scikit-image's bundled photos (no download): natural scenes first, then textures
ERF_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "clock",
    "moon",
    "brick",
    "grass",
    "gravel",
    "immunohistochemistry",
)
SHARES = (0.2, 0.5, 0.9)  # the radii written: radius_20, radius_50, radius_90
WRT = ("input", "tokens")
BATCH = 8  # images per backward pass
DECADES = 6  # the picture's colour range: shares down to 10^-6 of the peak's (attention's spread shows at ~10^-5)
JSON_NAME, PNG_NAME = "erf.json", "erf.png"
DEFINITION = (
    "map = sum over images and channels of |d s / d x|, normalised to sum 1, where s = sum over images and channels "
    "of ReLU(y), y stage K's output at its centre token (H//2, W//2); model in eval mode, float32. wrt input: x = the "
    "normalised images, map in input pixels. wrt tokens: x = the stage's input tokens (after its downsampling) and "
    "y - x for y (the blocks' mixing without the skip connection), map in tokens. radius_p: radius of the smallest "
    "disc around `centre` holding share p of the map (a pixel is inside when its centre is); `centre` is the centre "
    "token, or for wrt input the pixel under it, stride * (H//2, W//2). The PNG shows log10(share / peak share)."
)


@dataclass
class ErfSettings:
    """One `mambaout erf` call; maps 1:1 to its flags.

    Attributes:
        model: Registered variant built at random init (seeded), once per mixer; default `mambaout_femto` when no
            checkpoint is given.
        checkpoint: `mambaout train` checkpoints, each measured as trained (its model and mixer come from it).
        model_kwargs: Constructor arguments for `model` (e.g. `{"depths": [1, 1, 1, 1]}`), token_mixer aside.
        token_mixer: Mixers of `mambaout.layers.TOKEN_MIXERS`, one model each; None: `DEFAULT_ERF_MIXERS`.
        stage: The stage whose centre token is measured, 1 to the number of stages.
        wrt: "input" (the images) or "tokens" (the stage's own input tokens: its blocks' mixing alone).
        img_size: Square input size in pixels; default a checkpoint's training size, else 224.
        images: Images whose gradients are summed.
        data: An image folder (searched recursively); default a checkpoint's validation split when it is on disk,
            else scikit-image's bundled photos (`ERF_PHOTOS`).
        seed: Seeds the random init (every mixer's model from the same seed) and the draw of images from `data`.
        device: "auto", "cpu", "cuda" or "cuda:N".
        output: The folder of erf.json, erf.png and one .npy per map.
        force: Write into an existing folder that holds other files and no erf.json.
    """

    model: str | None = None
    checkpoint: tuple[str, ...] = ()
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    token_mixer: tuple[str, ...] | None = None
    stage: int = 1
    wrt: str = "input"
    img_size: int | None = None
    images: int = 8
    data: str | None = None
    seed: int = 0
    device: str = "auto"
    output: str = "erf"
    force: bool = False

    def __post_init__(self) -> None:
        self.checkpoint = tuple(self.checkpoint)
        if self.checkpoint and self.model:
            raise UserError("--model and --checkpoint: give one (a registered model at random init, or trained runs)")
        if self.checkpoint and (self.token_mixer is not None or self.model_kwargs):
            given = "--token-mixer" if self.token_mixer is not None else "--model-kwargs"
            raise UserError(f"{given} with --checkpoint: a checkpoint's model and mixer are its own; drop {given}")
        if not self.checkpoint:
            self.model = self.model or DEFAULT_MODEL
            given = DEFAULT_ERF_MIXERS if self.token_mixer is None else self.token_mixer
            self.token_mixer = tuple(dict.fromkeys(given))  # in order, without repeats
            unknown = [m for m in self.token_mixer if m not in TOKEN_MIXERS]
            if unknown or not self.token_mixer:
                raise UserError(f"--token-mixer {','.join(unknown) or '(none)'}: choose from {', '.join(TOKEN_MIXERS)}")
        if "token_mixer" in self.model_kwargs:
            raise UserError("--model-kwargs: leave token_mixer out, --token-mixer sets it")
        if self.wrt not in WRT:
            raise UserError(f"--wrt {self.wrt}: choose input or tokens")
        if self.stage < 1:
            raise UserError(f"--stage must be at least 1, got {self.stage}")
        if self.images < 1:
            raise UserError(f"--images must be at least 1, got {self.images}")
        if self.data is not None and not Path(self.data).expanduser().is_dir():
            raise UserError(f"--data {self.data}: no such folder (give a folder of images)")


@dataclass
class ErfMap:
    """One measured ERF.

    Attributes:
        model: Registered variant.
        mixer: Its token mixer.
        checkpoint: The checkpoint it came from, or None for a random init.
        stage: The stage measured (1-based).
        wrt: "input" or "tokens".
        erf: `[H, W]` float64 shares, summing to 1 (input pixels or the stage's tokens).
        centre: (row, column) the radii are measured around.
        stride: Input pixels per token side at this stage.
        img_size: Input side in pixels.
        data: Where the images came from.
        image_names: The images used, in order.
        seconds: Wall time of the gradients.
    """

    model: str
    mixer: str
    checkpoint: str | None
    stage: int
    wrt: str
    erf: np.ndarray
    centre: tuple[int, int]
    stride: int
    img_size: int
    data: str
    image_names: list[str]
    seconds: float

    def radii(self) -> tuple[float, ...]:
        """The radii of `SHARES` around `centre`, in map pixels."""
        return mass_radii(self.erf, self.centre, SHARES)

    def record(self, file: str) -> dict[str, Any]:
        """The map's row of erf.json, its array saved as `file` (relative to the folder)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("erf", "seconds")}
        row.update(
            file=file,
            shape=list(self.erf.shape),
            unit="input pixel" if self.wrt == "input" else "token",
            centre=list(self.centre),
            images=len(self.image_names),
            centre_share=round(float(self.erf[self.centre]), 6),
            seconds=round(self.seconds, 2),
        )
        row.update({f"radius_{round(p * 100)}": round(r, 3) for p, r in zip(SHARES, self.radii(), strict=True)})
        return row


@dataclass
class _Subject:
    """A network to measure, with where it came from and how its images are prepared."""

    model: MambaOut
    name: str
    mixer: str
    checkpoint: str | None
    data: dict[str, Any]  # timm data config: input_size, interpolation, crop_pct, mean, std
    default_data: Path | None  # its run's validation split, when on disk


def mass_radii(erf: np.ndarray, centre: tuple[int, int], shares: Sequence[float]) -> tuple[float, ...]:
    """Radii of the smallest discs around `centre` holding each share of `erf`'s mass.

    A pixel is inside a disc when its centre is, so a radius is one of the distances √(dy² + dx²) between pixel
    centres; the disc may reach past the map's edges, where there is no mass.

    Args:
        erf: `[H, W]` non-negative map with positive sum.
        centre: (row, column) of the discs' centre.
        shares: Shares of the total mass in (0, 1].

    Returns:
        One radius per share, in pixels of the map; non-decreasing in the share.
    """
    rows, cols = np.indices(erf.shape)
    distance = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(distance, kind="stable")
    held = np.cumsum(erf.ravel()[order], dtype=np.float64)
    # a share met exactly (a hand-made map) counts as held despite the cumulative sum's round-off
    found = np.searchsorted(held, np.asarray(shares) * held[-1] * (1 - 1e-12))
    return tuple(float(distance[order][min(i, len(held) - 1)]) for i in found)


def token_side(model: MambaOut, stage: int, img_size: int) -> int:
    """The side H = W of stage `stage`'s token map for `img_size`² images."""
    return math.ceil(img_size / model.feature_info[stage - 1]["reduction"])  # each stride-2 conv gives ceil(n / 2)


def centre_of(model: MambaOut, stage: int, img_size: int, wrt: str) -> tuple[int, int]:
    """Where `effective_receptive_field`'s map is centred: the centre token (H//2, W//2) of the stage's H×W map, or
    for `wrt="input"` the input pixel under it, stride·(H//2, W//2)."""
    middle = token_side(model, stage, img_size) // 2
    stride = 1 if wrt == "tokens" else model.feature_info[stage - 1]["reduction"]
    return stride * middle, stride * middle


def _stage_tokens(model: MambaOut, x: torch.Tensor, stage: int) -> torch.Tensor:
    """Images `[B, 3, S, S]` -> the input of stage `stage`'s first block `[B, H, W, C]`."""
    x = model.stem(x)
    for earlier in model.stages[: stage - 1]:
        x = earlier(x)
    return model.stages[stage - 1].downsample(x)


def effective_receptive_field(model: MambaOut, images: torch.Tensor, stage: int, wrt: str = "input") -> np.ndarray:
    """The ERF of stage `stage`'s centre token (see the module docstring for the definition).

    Args:
        model: In eval mode, float32; its parameters may or may not require gradients.
        images: Normalised images `[N, 3, S, S]`, on the model's device.
        stage: 1 to the number of stages.
        wrt: "input" (map `[S, S]` over the images' pixels) or "tokens" (map `[H, W]` over the stage's input tokens,
            skip connection removed).

    Returns:
        `[H, W]` float64 shares, summing to 1.

    Raises:
        UserError: The map is zero everywhere (nothing in the stage depends on what it is taken with respect to).
    """
    blocks = model.stages[stage - 1].blocks
    total = None
    for chunk in images.split(BATCH):
        if wrt == "input":
            leaf = chunk.detach().requires_grad_()
            y = blocks(_stage_tokens(model, leaf, stage))  # [B, H, W, C]
        else:
            with torch.no_grad():
                leaf = _stage_tokens(model, chunk, stage).requires_grad_()
            y = blocks(leaf) - leaf  # the blocks' residual branches: the stage less its skip connection
        (grad,) = torch.autograd.grad(y[:, y.shape[1] // 2, y.shape[2] // 2, :].relu().sum(), leaf)
        channels = 1 if wrt == "input" else 3  # [B, 3, S, S] or [B, H, W, C]
        part = grad.abs().sum(dim=(0, channels)).double()
        total = part if total is None else total + part
    erf = total.cpu().numpy()
    mass = erf.sum()
    if not mass > 0:
        raise UserError(f"the ERF of stage {stage} w.r.t. its {wrt} is zero everywhere: nothing to normalise")
    return erf / mass


def _photo(name: str) -> Image.Image:
    import skimage.data  # imported on use: scikit-image takes a second to load

    pixels = getattr(skimage.data, name)()
    return to_rgb(Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels))


def erf_images(
    data: str | Path | None, count: int, config: dict[str, Any], seed: int = 0
) -> tuple[torch.Tensor, str, list[str]]:
    """`count` images for an ERF, through the model's evaluation transform (resize, centre crop, normalise).

    Args:
        data: An image folder, searched recursively: `count` readable images drawn at random (`seed`), unreadable
            ones skipped; None: the first `count` of scikit-image's bundled photos (`ERF_PHOTOS`).
        count: Images wanted; fewer are used (with a warning) when the source has fewer.
        config: The model's timm data config (`mambaout.data.data_config`).
        seed: The draw from `data`.

    Returns:
        `([N, 3, S, S]` float32 images, where they came from, their names).

    Raises:
        UserError: `data` has no readable image.
    """
    transform = eval_transform(config)
    unreadable: list[str] = []
    if data is None:
        names = list(ERF_PHOTOS[:count])
        tensors = [transform(_photo(name)) for name in names]
        source = "scikit-image photos (skimage.data)"
    else:
        root = Path(data).expanduser()
        files, _ = list_images([root])
        random.Random(seed).shuffle(files)
        tensors, names = [], []
        for path in files:
            if len(tensors) == count:
                break
            try:
                tensors.append(transform(load_image(path)))
            except UnreadableImage as e:
                unreadable.append(f"{path.relative_to(root)} ({e.reason})")
                continue
            names.append(str(path.relative_to(root)))
        if not tensors:
            raise UserError(f"--data {data}: no readable image in it")
        source = str(root)
    if len(tensors) < count:
        skipped = f" (skipped {len(unreadable)} unreadable: {'; '.join(unreadable[:5])})" if unreadable else ""
        message = f"{source} has {len(tensors)} usable images{skipped}, fewer than --images {count}: using those"
        warnings.warn(message, stacklevel=2)
    return torch.stack(tensors), source, names


def _subjects(settings: ErfSettings) -> list[_Subject]:
    """The networks the settings name: the model once per mixer (seeded), or each checkpoint as trained."""
    found = []
    if settings.checkpoint:
        for path in settings.checkpoint:
            saved = read_checkpoint(path)  # one line for a missing, unreadable or foreign file
            classifier = load_classifier(path)  # one line for a model that cannot be built from it
            mixer = saved["config"].get("model_kwargs", {}).get("token_mixer", "conv")  # a name: the model was built
            val = classifier.val_data if classifier.val_data is not None and classifier.val_data.is_dir() else None
            found.append(_Subject(classifier.model, classifier.model_name, mixer, path, classifier.data, val))
        return found
    for mixer in settings.token_mixer or ():
        torch.manual_seed(settings.seed)
        model = create_configured_model(
            settings.model, {**settings.model_kwargs, "token_mixer": mixer}, "--model-kwargs", num_classes=0
        )
        found.append(_Subject(model.eval(), settings.model, mixer, None, data_config(model), None))
    return found


def _check_geometry(subject: _Subject, stage: int, img_size: int) -> None:
    stages = len(subject.model.stages)
    if stage > stages:
        raise UserError(f"--stage {stage}: {subject.name} has stages 1-{stages}")
    stride = subject.model.feature_info[stage - 1]["reduction"]
    side = token_side(subject.model, stage, img_size)
    if side < 3:
        raise UserError(
            f"--img-size {img_size} gives stage {stage} (stride {stride}) a {side}×{side} token map; an ERF needs at "
            f"least 3×3 around its centre: use --img-size {2 * stride + 1} or more"
        )


def _own_json(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return OUTPUT_KINDS["erf-json"](f.read(4096))
    except OSError:
        return False


def _claim_folder(out: Path, data: str | None, force: bool) -> None:
    """Refuse a file, the image folder or one inside it, or a folder of other files (no erf.json of ours) unless
    `force`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file: name a folder for erf.json, erf.png and the maps")
    if data is not None and Path(data).expanduser().resolve() in (out.resolve(), *out.resolve().parents):
        raise UserError(f"--output {out} is inside --data {data}: its plot would become one of the images")
    if force or not out.is_dir() or _own_json(out / JSON_NAME):
        return
    if any(out.iterdir()):
        raise UserError(
            f"--output {out} already holds files and no erf.json of `mambaout erf`: pick another folder, or pass "
            "--force to write into it"
        )


def _check_files(out: Path, npy_names: list[str], inputs: list[Path], force: bool) -> None:
    """Each file to write is no input, and no file of another kind (unless `force`)."""
    check_output(out / PNG_NAME, "--output", "png", inputs=inputs, force=force)
    check_output(out / JSON_NAME, "--output", "erf-json", inputs=inputs, force=force)
    for name in npy_names:
        check_output(out / name, "--output", "npy", inputs=inputs, force=force)


def _npy_names(subjects: list[_Subject], stage: int, wrt: str) -> list[str]:
    """One file name per map, `<model>-<mixer>-stage<K>-<wrt>.npy`, numbered where two maps share one."""
    seen: dict[str, int] = {}
    names = []
    for s in subjects:
        stem = f"{s.name}-{s.mixer}-stage{stage}-{wrt}"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}{'' if seen[stem] == 1 else f'-{seen[stem]}'}.npy")
    return names


@contextmanager
def _ieee_float32() -> Iterator[None]:
    """Full float32 in CUDA matmuls and convolutions (cuDNN's convolutions default to TF32's 10-bit mantissa)."""
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


def run_erf(settings: ErfSettings, log: Callable[[str], None] = print) -> list[ErfMap]:
    """Measure every map the settings name and write `erf.json`, `erf.png` and one `.npy` per map to the folder.

    Every check (flags, checkpoints, stage, size, output files) runs before the first gradient, and nothing is
    written before all maps are measured; erf.json is written last.

    Returns:
        The maps, in the order of the mixers or checkpoints.

    Raises:
        UserError: Bad settings, an unreadable checkpoint, a stage the model lacks or a size too small for it, an
            image folder without readable images, or an output that is not safe to write.
    """
    out = Path(settings.output).expanduser()
    _claim_folder(out, settings.data, settings.force)
    device = resolve_device(settings.device)
    subjects = _subjects(settings)
    for s in subjects:
        s.data = {**s.data, "input_size": (3, settings.img_size, settings.img_size)} if settings.img_size else s.data
        _check_geometry(s, settings.stage, s.data["input_size"][-1])
    inputs = [Path(p).expanduser() for p in settings.checkpoint]
    npy_names = _npy_names(subjects, settings.stage, settings.wrt)
    _check_files(out, npy_names, inputs, settings.force)
    loaded: dict[tuple[str, str], tuple[torch.Tensor, str, list[str]]] = {}
    batches = []  # each subject's images, read before the first gradient (an image folder may hold none)
    for s in subjects:
        data = settings.data if settings.data is not None else s.default_data
        key = (str(data), json.dumps(s.data, sort_keys=True, default=str))  # one read per source and preprocessing
        if key not in loaded:
            loaded[key] = erf_images(data, settings.images, s.data, settings.seed)
        batches.append(loaded[key])
    maps = []
    with _ieee_float32():
        for s, (images, source, names) in zip(subjects, batches, strict=True):
            model = s.model.to(device).float().eval()
            start = time.perf_counter()
            erf = effective_receptive_field(model, images.to(device), settings.stage, settings.wrt)
            seconds = time.perf_counter() - start
            img_size = s.data["input_size"][-1]
            centre = centre_of(model, settings.stage, img_size, settings.wrt)
            stride = model.feature_info[settings.stage - 1]["reduction"]
            maps.append(
                ErfMap(s.name, s.mixer, s.checkpoint, settings.stage, settings.wrt, erf, centre, stride, img_size,
                       source, names, seconds)
            )  # fmt: skip
            s.model.cpu()
            log(f"{s.name} {s.mixer}: {len(names)} images in {seconds:.1f} s")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output: cannot create {out}: {e.strerror or e}") from None
    write_erf(maps, npy_names, out, settings, device)
    log(f"wrote {out / JSON_NAME}, {out / PNG_NAME} and {len(maps)} .npy maps")
    return maps


def erf_table(maps: list[ErfMap]) -> str:
    """The maps' radii as a Markdown table (units: input pixels for wrt input, tokens for wrt tokens)."""
    lines = [
        "| model | mixer | stage | wrt | radius_20 | radius_50 | radius_90 | unit | centre share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in maps:
        r20, r50, r90 = m.radii()
        unit = "px" if m.wrt == "input" else "tokens"
        lines.append(
            f"| {m.model} | {m.mixer} | {m.stage} | {m.wrt} | {r20:.1f} | {r50:.1f} | {r90:.1f} | {unit} | "
            f"{m.erf[m.centre]:.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_erf(maps: list[ErfMap], npy_names: list[str], out: Path, settings: ErfSettings, device: torch.device) -> None:
    """The maps' `.npy` files, `erf.png`, then `erf.json`, each written atomically into `out`."""
    for erf_map, name in zip(maps, npy_names, strict=True):
        with atomic_write(out / name) as f:
            np.save(f, erf_map.erf)
    plot_erf(maps, out / PNG_NAME)
    record = {
        "kind": "mambaout erf",  # what tells our erf.json from other files (`mambaout.outputs`)
        "maps": [m.record(name) for m, name in zip(maps, npy_names, strict=True)],
        "plot": PNG_NAME,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("output", "force")},
        "device": str(device),
        "definition": DEFINITION,
    }
    with atomic_write(out / JSON_NAME) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())


def _titles(maps: list[ErfMap]) -> list[str]:
    """Each map's mixer, with its model or run folder where the mixer alone does not tell the maps apart."""
    mixers = [m.mixer for m in maps]
    if len(set(mixers)) == len(mixers):
        return mixers
    return [f"{m.mixer} · {Path(m.checkpoint).parent.name if m.checkpoint else m.model}" for m in maps]


def plot_erf(maps: list[ErfMap], path: Path) -> Path:
    """The maps side by side (four a row), colour log10(share / peak share) over `DECADES` decades, with the
    radius_20/50/90 discs drawn around each centre; written atomically."""
    columns = min(len(maps), 4)
    rows = math.ceil(len(maps) / columns)
    fig = Figure(figsize=(3.4 * columns + 1.2, 3.6 * rows + 0.5), layout="constrained")  # no pyplot: no GUI, no state
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    image = None
    for ax, erf_map, title in zip(axes, maps, _titles(maps), strict=False):
        shown = np.log10(np.maximum(erf_map.erf / erf_map.erf.max(), 10.0**-DECADES))
        image = ax.imshow(shown, cmap="viridis", vmin=-DECADES, vmax=0, interpolation="nearest")
        cy, cx = erf_map.centre
        for share, radius, style in zip(SHARES, erf_map.radii(), ("-", "--", ":"), strict=True):
            # a radius 0 disc (the centre alone) is drawn as half a pixel, so that it shows
            ax.add_patch(Circle((cx, cy), max(radius, 0.5), fill=False, color="white", linestyle=style, lw=1.2,
                                label=f"{round(share * 100)}%"))  # fmt: skip
        r20, r50, r90 = erf_map.radii()
        unit = "px" if erf_map.wrt == "input" else "tokens"
        ax.set_title(f"{title}\nr20 {r20:.1f} · r50 {r50:.1f} · r90 {r90:.1f} {unit}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps) :]:
        ax.axis("off")
    axes[0].legend(loc="lower left", fontsize=7, title="mass in disc", title_fontsize=7, framealpha=0.5)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="log10(share / peak share)")
    first = maps[0]
    against = "the input image" if first.wrt == "input" else "its input tokens (skip connection removed)"
    fig.suptitle(  # two lines: one row of two maps is narrower than the whole sentence
        f"ERF of stage {first.stage}'s centre token w.r.t. {against}\n{first.img_size} px, "
        f"{len(first.image_names)} images",
        fontsize=10,
    )
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})  # tells our plots from photos
    return path
