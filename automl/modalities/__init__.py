"""One adapter per input modality (modalities/image.py, modalities/text.py): how its inputs are read, checked,
stored, sampled for the plan's probes, augmented, saved beside an export, and parsed from a serving request.
Code outside the adapters asks `get(task.modality)` instead of branching on the modality's name, so a new
modality (audio, image+text pairs) is one new file that registers a `Modality`.
"""
from automl.modalities.base import Modality, detect, get, names, register
from automl.modalities import image as _image, text as _text  # noqa: E402,F401  (each registers itself)

__all__ = ["Modality", "detect", "get", "names", "register"]
