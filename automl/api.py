"""auto_finetune: the pipeline, stage by stage (the stages are in stages.py, the options in options.py)."""
from __future__ import annotations

import inspect
from typing import Any

from automl import stages
from automl.budget import Budget
from automl.cluster import connect, release
from automl.export.predictor import FinetunedModel
from automl.options import FinetuneOptions, options_doc
from automl.runtime import quiet_libraries


def auto_finetune(dataset: Any, label: str | None = None, *, options: FinetuneOptions | None = None,
                  **kwargs) -> FinetunedModel:
    given = {**({"label": label} if label is not None else {}), **kwargs}
    opts = options.replace(**given) if options else FinetuneOptions.from_kwargs(**given)
    quiet_libraries()
    budget = Budget(opts.search.time_budget_s)
    with budget.stage("prepare"):
        prepared = stages.prepare(dataset, data=opts.data, search=opts.search, update=opts.update,
                                  output=opts.output)  # bad input fails here, before any compute
    with budget.stage("connect"):
        warming = stages.warm_libraries(prepared, opts.search)  # while Ray starts
        ray = connect(opts.resources.ray_address, cluster_config=opts.resources.cluster_config,
                      verbose=opts.output.verbose)
        warming.join()
    try:
        with budget.stage("plan"):
            plan = stages.plan(prepared, ray, budget, search=opts.search, resources=opts.resources,
                               diagnostics=opts.diagnostics, output=opts.output)
            inputs = stages.materialise(prepared, plan, resources=opts.resources)
        with budget.stage("rung 0"):
            rung0 = stages.probe(prepared, plan, inputs, budget, search=opts.search, resources=opts.resources,
                                 output=opts.output)  # frozen features + linear heads, every backbone
        with budget.stage("search"):
            result = stages.search(prepared, plan, inputs, budget, rung0, search=opts.search,
                                   resources=opts.resources, output=opts.output)
        with budget.stage("finalise"):
            final = stages.finalise(prepared, plan, inputs, result, budget, search=opts.search,
                                    resources=opts.resources, diagnostics=opts.diagnostics, output=opts.output)
        with budget.stage("evaluate"):
            test_metrics = stages.evaluate(prepared, inputs, final, budget, output=opts.output)
        with budget.stage("diagnose"):
            diagnostics = stages.diagnose(prepared, plan, inputs, result, final, budget, search=opts.search,
                                          diagnostics=opts.diagnostics, update=opts.update, output=opts.output)
        with budget.stage("export"):
            return stages.export(prepared, plan, inputs, result, final, test_metrics, diagnostics, budget,
                                 search=opts.search, output=opts.output)
    finally:
        release()  # a failed run must not keep the autoscaler's nodes up either


auto_finetune.__doc__ = f"""Fine-tune the best model for `dataset` within the time budget and export it.

dataset: a DataFrame, a CSV/TSV/Parquet/JSONL path, an image folder (root/<class>/<file>), (X, y) arrays,
    or a Hugging Face Dataset. label: the label column (found automatically when named label/target/…).
options: a FinetuneOptions; or give any option as a keyword argument. The options, by group:

{options_doc()}

Returns a FinetunedModel: predict / predict_proba / evaluate, export_dir, trials, manifest.
"""
# help() and IDEs show every option as a keyword argument; the list itself lives in options.py.
auto_finetune.__signature__ = inspect.Signature(
    [inspect.Parameter("dataset", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("label", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
     inspect.Parameter("options", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
       for name, value in FinetuneOptions().flat().items() if name != "label"],
    return_annotation=FinetunedModel)
