"""Does the application's model flow cost anything? One INT8 evaluation of the Fashion-MNIST
test split, alternating in one process between the reference model quantized by hand
(``replace_modules`` + ``apply_rules`` + ``calibrate``) and by ``qdqapp.flow``
(``Session.open`` + ``calibrate_model``), so machine load hits both alike.

    python scripts/bench_app_flow.py --rounds 3
"""

from __future__ import annotations

import argparse
import time

import torch

import qdq
import sensitivity
from qdq.rules import apply_rules
from qdqapp.data import fashion_mnist
from qdqapp.evaluate import top1_accuracy
from qdqapp.flow import Session, calibrate_model
from qdqapp.reference import load_reference_model
from qdqapp.specs import parse_data, parse_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = parse_model("reference")
    session = Session.open(model, parse_data("fashion-mnist", model=model))
    calibrate_model(session.prepared, session.source.calib(), 8, "max", progress=False)
    by_hand = load_reference_model().eval()
    qdq.replace_modules(by_hand)
    by_hand = apply_rules(by_hand, session.prepared.example)
    sensitivity.calibrate(by_hand, session.source.calib(), progress=False)
    test = torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=256)
    ratios = []
    for r in range(args.rounds):
        start = time.perf_counter()
        a = top1_accuracy(by_hand, test)
        hand = time.perf_counter() - start
        start = time.perf_counter()
        b = top1_accuracy(session.model, session.source.eval())
        flow = time.perf_counter() - start
        ratios.append(flow / hand)
        print(f"round {r + 1}: by hand {hand:.1f} s ({a:.2f}%), flow {flow:.1f} s ({b:.2f}%), "
              f"flow/hand {flow / hand:.2f}")
    print(f"median flow/hand {sorted(ratios)[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
