"""One row per trained model: faces-gdf/test, faces-ood (out of source), the two sample photos.

    python benchmarks/recipe_table.py runs/a/best_model.pth runs/b/best_model.pth [--shared ../shared] [--json out.json]

For each model (`tools.build_default_model.measure`): accuracy on faces-gdf/test (95% Wilson interval); on
faces-ood (FairFace, never trained on) accuracy, female and male recall, and the worst age group and
race (groups of at least 10 faces, from manifest.csv); and how many of the 7 faces of the sample
photos are labelled right (group_6_faces.jpg: F, F, M, M, M, F from left to right;
astronaut_female.png: F). docs/recipes.md's comparison and the model card come from these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# tools/ (the maintainer tools beside the package) is imported from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1] / ".." / "shared"))
    parser.add_argument("--json", help="also write the rows (with per-group accuracies) to this file")
    args = parser.parse_args()
    from tools.build_default_model import format_measurement, measure

    rows = []
    for path in args.models:
        rows.append(measure(path, args.shared))
        print(format_measurement(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
