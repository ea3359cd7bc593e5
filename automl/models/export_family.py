"""An earlier automl export as the starting point of a new fine-tune (model updates).

The export's own architecture and weights are loaded; the head grows to the new
number of classes with the old rows kept (new classes are appended), so the model
starts out predicting the old classes exactly as before.
"""
from __future__ import annotations

import os

from automl.errors import ModelLoadError
from automl.models.base import Family
from automl.models.registry import BackboneSpec, family, register_family


class ExportFamily(Family):
    library = "automl"

    def build(self, spec, num_classes, *, dropout=0.0, drop_path=0.0, pretrained=None):
        from automl.export.writer import load_model

        model, _, manifest = load_model(spec.model)
        if num_classes < manifest.num_classes:
            raise ModelLoadError(f"Base model {spec.model!r} has {manifest.num_classes} outputs but the new task has "
                                 f"{num_classes}; an update keeps every class of the base model.")
        return family(model).grow_head(model, num_classes)

    def underlying(self, spec):
        from automl.export.manifest import ExportManifest

        inner = ExportManifest.read(spec.model).backbone
        if inner.library == "hf":
            return BackboneSpec("hf", os.path.join(spec.model, "hf"), pretrained=False)
        return inner

    def encoder(self, model, spec, config):
        return family(model).encoder(model, self.underlying(spec), config)


register_family(ExportFamily())
