"""Resolution against length for the start point alone, at equal training time (RESULTS: "ours and `fixed` in the
same run"): EfficientNet-Lite0 on Tux Paint stamps, `fixed`'s config (zero head, 2 threads, in-process), trained at
128 px for 232 steps and at 112 px for 300 (112² / 128² = 0.77 of the pixels a step).

    python benchmarks/size_vs_length.py SEED
"""
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402
import torch  # noqa: E402

from automl.data.inputs import Inputs  # noqa: E402
from automl.data.intake import prepare  # noqa: E402
from automl.export.manifest import ExportManifest, Preprocessing  # noqa: E402
from automl.export.predictor import FinetunedModel  # noqa: E402
from automl.models import resolve  # noqa: E402
from automl.search.space import load_space  # noqa: E402
from automl.training.loop import fit, full_config  # noqa: E402


def main(seed: int) -> None:
    torch.set_num_threads(2)
    df = quality.split(quality.SETS["stamps"](), seed)
    task = prepare(df, "label", seed=seed)
    space = load_space("cpu_small", task.modality)
    for size, steps in ((128, 232), (112, 300)):
        cfg = full_config({**space.default_config(), "seed": seed, "image_size": size})
        cfg["report_rows"] = steps * int(cfg["batch_size"]) // 12
        inputs = Inputs.materialise(task, size, Path(tempfile.mkdtemp()))
        t0 = time.monotonic()
        res = fit(cfg, inputs.trial_data(), epochs=12, device=torch.device("cpu"))
        took = time.monotonic() - t0
        manifest = ExportManifest(task=task.task, modality=task.modality, classes=list(task.classes),
                                  label_column="label", input_columns=task.input_columns, metric="f1_macro",
                                  backbone=resolve(cfg["backbone"]),
                                  preprocessing=Preprocessing(**res.encoder.to_dict(), storage_size=size))
        f1 = quality.macro_f1(FinetunedModel(res.model, res.encoder, manifest), df)
        print(f"seed {seed} size {size} steps {steps}: test {f1:.4f} val {res.history[-1]['val_f1_macro']:.4f} "
              f"train {took:.0f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
