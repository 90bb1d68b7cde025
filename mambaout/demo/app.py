"""The demo page (gradio): a photo in; its top classes, the time and device, and where the model looked out.

The page has two tabs. "One image" takes an upload, a paste, a webcam shot or a bundled example and shows the top-k
classes with their probabilities, the forward pass's latency and the device, and a class-activation map (Grad-CAM on
the last stage, or the head applied at each position) of the predicted or a chosen class blended on the photo; the
input size and the model (reference or `optimize_for_inference`) can be changed, and one button times both models
on the same input. "Several images" classifies a batch of files into a table.

A file that cannot be read (not an image, truncated, over the pixel limit) or an option out of range becomes a
message on the page and one line on the server's console (`refused upload: ...`, `refused option: ...`; no
traceback), and the server carries on. Requests queue and run one at a time. The API: `/classify` (image, top, input
size, model, map class, map method -> top classes, map, details), `/compare` (image, input size, top -> table) and
`/classify_many` (files, top, input size, model -> table).
"""

import dataclasses
import html
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image
from torch import nn

from mambaout.data import UnreadableImage, load_image
from mambaout.demo.predict import (
    CAM_METHODS,
    activation_map,
    blend_map,
    crop_box,
    default_stage,
    input_sizes,
    model_input,
    photo_map,
    top_classes,
)
from mambaout.errors import UserError, one_line
from mambaout.fast import optimize_for_inference
from mambaout.train.inference import Classifier, predict_files

__all__ = ["DemoPage", "build_app", "serve"]

MODEL_NAMES = {"reference": "reference", "optimized": "optimize_for_inference"}
CAM_NAMES = dict(zip(CAM_METHODS, ("Grad-CAM", "the head at each position"), strict=True))
AUTO_STAGE = "auto"  # Grad-CAM on the last stage whose map is at least 4 cells wide (`default_stage`)
PREDICTED = -1  # the map-class choice meaning "whichever class comes first"
MAX_TOP = 10
DISPLAY_SIDE = 640  # the activation map is drawn on the photo scaled to about this longer side
COMPARE_REPEATS = 5  # timed calls per model in a comparison, after one untimed warm-up call
QUEUE_SIZE = 32  # requests waiting beyond this are refused with gradio's "queue is full"
MAX_FILES = 64  # files per "Several images" request, so that one request cannot hold the queue for long
# the upload's preview fills its box: gradio only shrinks images, so an 8×8 scan would stay a dot
PAGE_CSS = "#photo img { object-fit: contain; }"
EMPTY = "Upload, paste or take a photo, or pick an example below it."
FAILED = "Nothing to show: the last image or option was refused (the message is at the top right)."


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads > 1 else ''})"


def _for_display(photo: Image.Image) -> Image.Image:
    """`photo` with its longer side near `DISPLAY_SIDE`: shrunk smoothly, or enlarged by whole pixels (an 8×8 scan
    stays a crisp grid)."""
    factor = DISPLAY_SIDE / max(photo.size)
    if factor < 1:
        shown = photo.copy()
        shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        return shown
    return photo.resize((photo.width * int(factor), photo.height * int(factor)), Image.Resampling.NEAREST)


def _unique(names: list[str]) -> list[str]:
    """Class names as labels: a name that several classes share (ImageNet's two 'crane's) gets its index."""
    counts = Counter(names)
    return [f"{name} (class {i})" if counts[name] > 1 else name for i, name in enumerate(names)]


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _refuse(what: str, message: str, title: str) -> gr.Error:
    """The error that refuses a request: `refused <what>: <message>` as one line on the server's console, and the
    message in the page's toast.

    A refusal is the page working, not a bug: gradio prints a traceback for every error an event raises unless the
    error is made with `print_exception=False`. The message quotes the user's file names and values, so its
    whitespace is collapsed (a name cannot forge console lines) and, for the toast, which renders HTML, it is escaped.
    """
    line = one_line(message, limit=500)
    print(f"refused {what}: {line}", file=sys.stderr, flush=True)
    return gr.Error(html.escape(line, quote=False), title=title, print_exception=False)


def _integer(value: Any) -> int | None:
    """`value` as an int when it is a whole number (the API may send 5, 5.0 or "5"), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _upload(value: str | dict[str, Any]) -> tuple[str, str]:
    """(path on the server, the name the user gave it) of an image input: a path, or gradio's file payload."""
    if isinstance(value, dict):
        return value["path"], value.get("orig_name") or Path(value["path"]).name
    return str(value), Path(value).name


class DemoPage:
    """What the page's events call, around one classifier and its `optimize_for_inference` twin.

    Image inputs are file paths, or gradio's file payloads (`{"path", "orig_name", ...}`): the image events skip
    gradio's preprocessing, which would open the upload with PIL before `load_image` could say what is wrong
    with it (and would refuse an option with a traceback on the console), so every option is checked here rather
    than by gradio, and every refusal is made by `_refuse`.

    Args:
        classifier: From `load_classifier`; its model stays the reference (Grad-CAM differentiates it).
    """

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.device = next(classifier.model.parameters()).device
        self.models: dict[str, nn.Module] = {
            "reference": classifier.model,
            "optimized": optimize_for_inference(classifier.model),
        }
        self.labels = _unique(classifier.class_names)
        self.native_size = classifier.data["input_size"][-1]
        self.sizes = input_sizes(self.native_size)
        self.stages = len(classifier.model.feature_info)
        blank = torch.zeros(1, 3, self.native_size, self.native_size)
        for net in self.models.values():  # the first call pays one-off costs that the first latency shown should not
            top_classes(net, blank, 1)

    def data(self, input_size: int | None = None) -> dict[str, Any]:
        """The classifier's preprocessing at `input_size` (one of `sizes`; None: its own)."""
        side = self.native_size if input_size is None else _integer(input_size)
        if side not in self.sizes:
            raise _refuse("option", f"input size must be one of {self.sizes}, not {input_size!r}", "Bad option")
        return {**self.classifier.data, "input_size": (3, side, side)}

    def _model(self, kind: str) -> nn.Module:
        if not isinstance(kind, str) or kind not in self.models:
            raise _refuse("option", f"model must be one of {', '.join(self.models)}, not {kind!r}", "Bad option")
        return self.models[kind]

    def _top(self, top: float) -> int:
        number = _integer(top)
        if number is None or not 1 <= number <= len(self.labels):
            raise _refuse("option", f"top must be 1 to {len(self.labels)}, not {top!r}", "Bad option")
        return number

    def _read(self, value: str | dict[str, Any]) -> tuple[Image.Image, str]:
        path, name = _upload(value)
        try:
            return load_image(path), name
        except UnreadableImage as e:
            raise _refuse("upload", f"{name}: {e.reason}", "Cannot read the image") from None

    def classify(
        self,
        image: str | dict[str, Any] | None,
        top: float = 5,
        input_size: int | None = None,
        model: str = "reference",
        cam_class: int = PREDICTED,
        cam_method: str = "grad-cam",
        cam_stage: str = AUTO_STAGE,
    ) -> tuple[dict[str, float] | None, Image.Image | None, str]:
        """One image -> (top classes as {label: probability}, the activation map on the photo, a Markdown line
        naming the image, its sizes, the latency and the device). No image: empty outputs and a hint.

        `cam_stage` is Grad-CAM's stage, "1" to the number of stages or "auto"; the head's map is the last stage's.

        Raises:
            gr.Error: Not a readable image, or an option out of range (a message on the page; the server goes on).
        """
        if image is None:
            return None, None, EMPTY
        stages = [AUTO_STAGE, *map(str, range(1, self.stages + 1))]
        target = _integer(cam_class)
        if (
            not isinstance(cam_method, str)
            or cam_method not in CAM_NAMES
            or str(cam_stage) not in stages
            or target is None
            or not PREDICTED <= target < len(self.labels)
        ):
            message = f"no {cam_method!r} map of class {cam_class!r} at stage {cam_stage!r}"
            raise _refuse("option", message, "Bad option")
        data, net, top = self.data(input_size), self._model(model), self._top(top)
        side = data["input_size"][-1]
        if cam_method == "head":
            stage = self.stages - 1
        else:
            stage = default_stage(self.classifier.model, side) if cam_stage == AUTO_STAGE else int(cam_stage) - 1
        photo, name = self._read(image)
        start = time.perf_counter()
        x = model_input(photo, data)
        prepared = time.perf_counter() - start
        found = top_classes(net, x, top)
        target = found.indices[0] if target == PREDICTED else target
        heat = activation_map(self.classifier.model, x, target, cam_method, stage)
        shown = _for_display(photo)
        overlay = blend_map(shown, photo_map(heat, shown.size, data), crop_box(shown.size, data))
        details = (
            f"**{name}** ({photo.width}×{photo.height} px, seen at {side}×{side}): forward "
            f"**{_milliseconds(found.seconds)}** with the {MODEL_NAMES[model]} model on "
            f"**{_device_name(self.device)}** (resizing {_milliseconds(prepared)}). "
            f"Map: {CAM_NAMES[cam_method]} on stage {stage + 1} of {self.stages} ({heat.shape[0]}×{heat.shape[1]} "
            f"cells) for *{self.labels[target]}*; a dimmed part of the photo is outside the model's crop."
        )
        return {self.labels[i]: p for i, p in zip(found.indices, found.probabilities, strict=True)}, overlay, details

    def compare(self, image: str | dict[str, Any] | None, input_size: int | None = None, top: float = 5) -> str:
        """Time the reference model and its `optimize_for_inference` twin on one image: a Markdown table with each
        one's top class and median forward time, whether their top classes agree and the speed ratio."""
        if image is None:
            raise _refuse("upload", "pick an image first", "No image")
        data, top = self.data(input_size), self._top(top)
        x = model_input(self._read(image)[0], data)
        runs = {
            kind: [top_classes(net, x, top) for _ in range(COMPARE_REPEATS + 1)][1:]
            for kind, net in self.models.items()
        }
        seconds = {kind: statistics.median(r.seconds for r in found) for kind, found in runs.items()}
        reference, optimized = runs["reference"][0], runs["optimized"][0]
        difference = max(abs(a - b) for a, b in zip(reference.probabilities, optimized.probabilities, strict=True))
        rows = [
            f"| {MODEL_NAMES[kind]} | {self.labels[found[0].indices[0]]} ({found[0].probabilities[0]:.2%}) | "
            f"{_milliseconds(seconds[kind])} |"
            for kind, found in runs.items()
        ]
        return "\n".join(
            [
                f"| model | top class | forward (median of {COMPARE_REPEATS}) |",
                "|---|---|---|",
                *rows,
                "",
                f"Same top {len(reference.indices)}: {'yes' if reference.indices == optimized.indices else '**no**'}; "
                f"largest probability difference {difference:.1e}; optimize_for_inference runs "
                f"{seconds['reference'] / seconds['optimized']:.2f}× the reference's speed at {data['input_size'][-1]} "
                f"px on {_device_name(self.device)}.",
            ]
        )

    def classify_many(
        self,
        images: list[str | dict[str, Any]] | None,
        top: float = 5,
        input_size: int | None = None,
        model: str = "reference",
    ) -> list[list[str]]:
        """Several files (paths or gradio's file payloads) -> one table row each: the file's name, top class, its
        probability, the top `top` classes (an unreadable file gets a row saying why)."""
        if not images:
            return []
        if len(images) > MAX_FILES:
            raise _refuse("upload", f"at most {MAX_FILES} files at a time, not {len(images)}", "Too many files")
        classifier = dataclasses.replace(self.classifier, model=self._model(model), data=self.data(input_size))
        uploads = [_upload(image) for image in images]
        names = dict(uploads)  # path on the server -> the name the user gave it
        try:
            results, unreadable = predict_files(classifier, [path for path, _ in uploads], self._top(top), batch_size=8)
        except UserError as e:
            raise _refuse("upload", str(e), "Cannot classify") from None
        rows = {}
        for result in results:
            found = result["predictions"]
            ranked = ", ".join(f"{self.labels[p['index']]} {p['probability']:.1%}" for p in found)
            best = f"{found[0]['probability']:.2%}"
            rows[result["path"]] = [names[result["path"]], self.labels[found[0]["index"]], best, ranked]
        for path, reason in unreadable:
            rows[path] = [names[path], f"unreadable: {reason}", "", ""]
        return [rows[path] for path, _ in uploads if path in rows]


def build_app(page: DemoPage, examples: list[Path]) -> gr.Blocks:
    """The page's layout and events (then `.queue()` and `.launch()` it, as `serve` does)."""
    classifier = page.classifier
    classes = len(page.labels)
    title = f"MambaOut demo: {classifier.model_name}"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# MambaOut demo\n**{classifier.model_name}**, {classes} classes, weights from `{classifier.source}`, "
            f"on {_device_name(page.device)}. Upload, paste or take a photo (or pick an example): the page shows "
            "the top classes and where the model looked."
        )
        with gr.Tab("One image"), gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    sources=["upload", "clipboard", "webcam"],
                    label="Image",
                    height=320,
                    elem_id="photo",
                )
                with gr.Row():
                    top = gr.Slider(1, min(MAX_TOP, classes), value=min(5, classes), step=1, label="Top classes")
                    size = gr.Dropdown(page.sizes, value=page.native_size, label="Input size (px)")
                model = gr.Radio([(v, k) for k, v in MODEL_NAMES.items()], value="reference", label="Model")
                cam_class = gr.Dropdown(
                    [("the predicted class", PREDICTED), *((name, i) for i, name in enumerate(page.labels))],
                    value=PREDICTED,
                    label="Map the class",
                )
                with gr.Row():
                    cam_method = gr.Radio(
                        [(v, k) for k, v in CAM_NAMES.items()], value="grad-cam", label="Activation map"
                    )
                    cam_stage = gr.Radio(
                        [AUTO_STAGE, *map(str, range(1, page.stages + 1))], value=AUTO_STAGE, label="Grad-CAM stage"
                    )
                classify = gr.Button("Classify", variant="primary")
                shown_examples = (
                    gr.Examples([[str(p)] for p in examples], inputs=image, label="Examples", elem_id="examples")
                    if examples
                    else None
                )
            with gr.Column():
                label = gr.Label(label="Top classes", elem_id="top-classes")
                overlay = gr.Image(label="Where the model looked", interactive=False, height=320, elem_id="map")
                details = gr.Markdown(EMPTY, label="Details", container=True, elem_id="details")
                compare = gr.Button("Compare reference and optimize_for_inference")
                comparison = gr.Markdown(label="comparison", elem_id="comparison")
        with gr.Tab("Several images"):
            files = gr.File(file_count="multiple", file_types=["image"], label="Images")
            classify_all = gr.Button("Classify all", variant="primary")
            table = gr.Dataframe(
                headers=["image", "top class", "probability", "top classes"], interactive=False, elem_id="table"
            )
        inputs, outputs = [image, top, size, model, cam_class, cam_method, cam_stage], [label, overlay, details]
        # the image's `input` (the user uploads, pastes, shoots or clears) rather than `change`, which gradio fires
        # twice when an upload replaces an image; preprocess=False on every event: the images reach `load_image`
        # unopened and the options reach DemoPage's checks unchecked (gradio still checks that a path is an upload)
        classified = gr.on(
            [classify.click, image.input, *(o.change for o in inputs[1:])],
            page.classify,
            inputs,
            outputs,
            api_name="classify",
            preprocess=False,
        )
        nothing = (None, None, FAILED)
        events = [(classified, outputs, nothing)]
        if shown_examples is not None:  # an example sets the image without an `input` event
            example = shown_examples.load_input_event.then(
                page.classify, inputs, outputs, preprocess=False, api_visibility="private"
            )
            events.append((example, outputs, nothing))
        compared = compare.click(page.compare, [image, size, top], comparison, api_name="compare", preprocess=False)
        several = gr.on(
            [classify_all.click, files.upload],
            page.classify_many,
            [files, top, size, model],
            table,
            api_name="classify_many",
            preprocess=False,
        )
        events += [(compared, comparison, FAILED), (several, table, [])]
        for event, shown, cleared in events:  # the message is gradio's toast; no output may show an older answer
            event.failure(lambda cleared=cleared: cleared, None, shown, api_visibility="private")
    return app


def serve(
    classifier: Classifier,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_upload_mb: float = 20,
    max_megapixels: float | None = None,
    examples: list[Path] | None = None,
) -> None:
    """Serve the page until interrupted.

    Args:
        classifier: The model to show.
        host: The address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: The port; None takes the first free one from 7860.
        share: Open gradio's public share link (a tunnel through gradio's servers).
        max_upload_mb: Uploads larger than this are refused.
        max_megapixels: Images with more pixels are refused (sets PIL's `Image.MAX_IMAGE_PIXELS` for this process,
            the limit `load_image` enforces); None keeps PIL's (about 89 megapixels).
        examples: Image files offered under the upload.

    Raises:
        UserError: The address or port cannot be listened on.
    """
    if max_megapixels is not None:
        Image.MAX_IMAGE_PIXELS = int(max_megapixels * 1e6)
    app = build_app(DemoPage(classifier), examples or [])
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=share,
            max_file_size=int(max_upload_mb * 2**20),
            show_error=False,
            ssr_mode=False,
            css=PAGE_CSS,
        )
    except OSError as e:
        raise UserError(
            f"--host {host} --port {port}: cannot listen there (the port is taken, or the address is not this "
            "machine's); pass another --port or --host"
        ) from e
