"""Image classification on a real dataset that ships offline: sklearn's 8x8 handwritten digits.

Run:  python examples/digits_image.py [time budget in seconds]
"""
import sys

import pandas as pd
from sklearn.datasets import load_digits

from automl import auto_finetune, load


def main(budget: float = 240) -> None:
    digits = load_digits()
    # One row per image: the image as an array, and its label. File paths, bytes or PIL images work too.
    df = pd.DataFrame({"image": list(digits.images), "label": digits.target})
    model = auto_finetune(df, label="label", time_budget_s=budget, output_dir="demo_output/digits")
    print(f"exported model: {model.export_dir}")
    print(f"test accuracy:  {model.metrics['accuracy']:.4f}")
    t = model.trials
    rung = t["rung"] if "rung" in t else 2
    print(f"configurations tried: {len(t)} on {t['config/backbone'].nunique()} backbones "
          f"({(rung == 0).sum()} linear heads on frozen features, {(rung != 0).sum()} fine-tunes; "
          f"stopped early by ASHA: {(t['status'] == 'STOPPED_EARLY').sum()})")
    print(f"final model: {model.manifest.training.get('decision') or model.manifest.training.get('how')}")
    again = load(model.export_dir)
    print("reloaded model predicts:", again.predict(df.head(10)).tolist(), "true:", df["label"].head(10).tolist())


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 240)
