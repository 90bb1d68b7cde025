"""The demo: a gradio page for any classifier (top-k, latency, class-activation map), a thin layer over the library.

The page lives in `mambaout.demo.app` (it imports gradio, the optional `demo` extra); what it computes is plain
functions here, usable without gradio.
"""

from mambaout.demo.examples import bundled_examples, held_out_images, skimage_photos
from mambaout.demo.loading import latest_default_run, load_demo_classifier
from mambaout.demo.predict import (
    CAM_METHODS,
    Prediction,
    activation_map,
    blend_map,
    crop_box,
    default_stage,
    input_sizes,
    model_input,
    photo_map,
    top_classes,
)

__all__ = [
    "CAM_METHODS",
    "Prediction",
    "activation_map",
    "blend_map",
    "bundled_examples",
    "crop_box",
    "default_stage",
    "held_out_images",
    "input_sizes",
    "latest_default_run",
    "load_demo_classifier",
    "model_input",
    "photo_map",
    "skimage_photos",
    "top_classes",
]
