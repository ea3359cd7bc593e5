#!/usr/bin/env bash
# The same from the shell: write digits as PNG files + a CSV, fine-tune, predict, evaluate.
# Usage: bash examples/cli.sh [time budget in seconds, default 180]
set -euo pipefail
BUDGET="${1:-180}"
mkdir -p demo_output/digits_png
python - <<'PY'
import numpy as np, pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
d = load_digits()
rows = []
for i, (img, y) in enumerate(zip(d.images, d.target)):
    Image.fromarray((img * 16).clip(0, 255).astype(np.uint8)).save(f"demo_output/digits_png/{i}.png")
    rows.append({"image": f"{i}.png", "label": int(y)})
pd.DataFrame(rows).to_csv("demo_output/digits_png/digits.csv", index=False)
PY
automl finetune demo_output/digits_png/digits.csv --label label --time-budget "$BUDGET" --output demo_output/cli_run
automl predict demo_output/cli_run/model demo_output/digits_png/digits.csv --output demo_output/preds.csv
automl evaluate demo_output/cli_run/model demo_output/digits_png/digits.csv
