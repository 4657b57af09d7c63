"""Speed of dlib's face-recognition ResNet: DlibResNet in PyTorch (fp32), the same exported to
ONNX in ONNX Runtime, and dlib's own compute_face_descriptor, on 150x150 chips.

    python benchmarks/dlib_speed.py [--threads 2] [--repeats 10]

Prints ms per face at batch 1 and batch 32 (median of the repeats, after a warm-up run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from facegender.core import dlib_onnx
from facegender.training import dlib_resnet as D


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import dlib
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (32, dlib_onnx.CHIP_SIZE, dlib_onnx.CHIP_SIZE, 3), dtype=np.uint8)
    x = D.to_input(chips)
    net = D.load_dlib_resnet()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dlib_resnet.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (x[:1],),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["descriptor"],
                dynamic_axes={"input": {0: "batch"}, "descriptor": {0: "batch"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    reference = dlib.face_recognition_model_v1(str(dlib_onnx.weights_file()))
    chip_list = list(chips)

    def pytorch(n):
        with torch.inference_mode():
            net(x[:n])

    def onnx(n):
        session.run(None, {"input": x[:n].numpy()})

    def dlib_run(n):
        if n == 1:
            reference.compute_face_descriptor(chip_list[0])
        else:
            reference.compute_face_descriptor(chip_list[:n])  # dlib's batch overload

    rows = []
    for name, fn in (("PyTorch fp32", pytorch), ("ONNX Runtime fp32", onnx), ("dlib", dlib_run)):
        row = [name]
        for n in (1, 32):
            repeats = args.repeats if n == 1 else max(2, args.repeats // 4)
            row.append(1000 * timed(lambda fn=fn, n=n: fn(n), repeats) / n)
        rows.append(row)
    print(
        f"DlibResNet, 150x150 chips, {args.threads} thread(s), torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, dlib {dlib.__version__}, {os.cpu_count()} CPUs visible, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'runtime':<20} {'batch 1 ms/face':>16} {'batch 32 ms/face':>17}")
    for name, b1, b32 in rows:
        print(f"{name:<20} {b1:16.1f} {b32:17.1f}")


if __name__ == "__main__":
    main()
