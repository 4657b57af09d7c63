"""The two shared sample photos through a trained model: is every face found and labelled right?

    python benchmarks/sample_photos.py --model output/best_model.pth [--shared ../shared]

group_6_faces.jpg has 6 people; from left to right (by the left edge of the face box): woman,
woman, man, man, man, woman. astronaut_female.png is one woman (short hair, spacesuit).
Prints each face with its box, label and probability, and the number labelled right.
The class names are taken to be the model's; pass --female/--male if they are not "female"/"male".
"""

from __future__ import annotations

import argparse
from pathlib import Path

TRUTH = {"images/group_6_faces.jpg": ["F", "F", "M", "M", "M", "F"], "images/astronaut_female.png": ["F"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1] / ".." / "shared"))
    parser.add_argument("--female", default="female")
    parser.add_argument("--male", default="male")
    args = parser.parse_args()

    from facegender.app.predict import Predictor

    predictor = Predictor.from_file(args.model, device="cpu")
    names = {"F": args.female, "M": args.male}
    right = total = 0
    for rel, truth in TRUTH.items():
        (result,) = predictor.predict_paths([Path(args.shared) / rel])
        faces = sorted(result.faces, key=lambda f: f.box[0])
        print(f"{rel}: {len(faces)} faces found, {len(truth)} expected")
        for i, face in enumerate(faces):
            expected = names[truth[i]] if i < len(truth) else "?"
            ok = face.label == expected
            right += ok
            print(
                f"  box x {face.box[0]:7.1f}  {face.label:<10} p={face.probability:.3f}  "
                f"expected {expected:<8} {'ok' if ok else 'WRONG'}"
            )
        total += len(truth)
    print(f"labelled right: {right}/{total}")


if __name__ == "__main__":
    main()
