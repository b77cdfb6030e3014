"""PTQ then QAT of the Fashion-MNIST reference CNN, on one device or under torchrun (DDP).

    # one process (GPU if there is one)
    PYTHONPATH=. python scripts/qat_finetune.py --out runs/qat
    # several processes: nccl on GPUs, gloo on CPUs
    PYTHONPATH=. torchrun --standalone --nproc_per_node 2 scripts/qat_finetune.py --out runs/qat

Steps: FP32 accuracy -> insert quantizers -> calibrate on training batches (every method
asked for, from one pass of statistics) -> PTQ accuracy per method -> QAT from the best
one (``qdq.qat.finetune``: ~10% of the 6-epoch schedule, 1% of its lr, cosine) -> QAT
accuracy -> optional ONNX export checked in ONNX Runtime. Results go to
``<out>/results.json`` (rank 0 writes every file); the best QAT model to
``<out>/qat_best.pt`` (``qdq.qat.load_checkpoint``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qdq import qat
from qdq.descriptor import QuantDescriptor
from qdq.fileio import atomic_write
from qdq.replace import quantizers, replace_modules
from qdqapp.data import fashion_mnist, fashion_mnist_loader
from qdqapp.reference import load_reference_model

#: The reference model's training schedule (scripts/train_reference.py defaults).
ORIGINAL_EPOCHS, ORIGINAL_LR = 6, 0.2


def log(*args) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


@torch.no_grad()
def top1(model, loader, device) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        out = model(x.to(device))
        correct += (out.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def calibrate(model, loader, batches: int, methods: list[str], device) -> dict[str, dict]:
    """Collect statistics once, then amax for every method: ``{method: {name: amax}}``."""
    qs = list(quantizers(model))
    model.eval()
    for _, q in qs:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    found = {}
    for method in methods:
        for _, q in qs:
            histogram = q.descriptor.calib_method == "histogram"
            q.load_calib_amax(method if histogram else None)
        found[method] = {name: q.amax.clone() for name, q in qs}
    for _, q in qs:
        q.disable_calib()
        q.enable_quant()
    return found


def set_amax(model, amax: dict) -> None:
    for name, q in quantizers(model):
        q.amax = amax[name]


def onnx_check(model, loader, path: Path) -> dict:
    """Export with Q/DQ and score the graph in ONNX Runtime on the same data, next to the
    PyTorch model: accuracy of each, predictions that differ, largest logit difference."""
    import onnxruntime as ort

    from export.onnx_export import to_onnx

    model = copy.deepcopy(model).cpu().eval()
    example = next(iter(loader))[0][:1]
    try:
        to_onnx(model, example, path)
    except ImportError:  # BatchNorm folding lives in qdq.rules, not in every checkout
        to_onnx(model, example, path, fold_bn=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    right_ort = right_torch = differ = total = 0
    max_diff = 0.0
    with torch.no_grad():
        for x, y in loader:
            got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
            ref = model(x)
            right_ort += (got.argmax(1) == y).sum().item()
            right_torch += (ref.argmax(1) == y).sum().item()
            differ += (got.argmax(1) != ref.argmax(1)).sum().item()
            max_diff = max(max_diff, (got - ref).abs().max().item())
            total += len(y)
    return {"ort": 100.0 * right_ort / total, "torch": 100.0 * right_torch / total,
            "predictions_differing": differ, "max_logit_diff": max_diff, "samples": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="float reference checkpoint "
                   "(default: the one shipped in qdqapp/assets)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder")
    p.add_argument("--calib", default="max", help="comma-separated: max,entropy,percentile,mse")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--epochs", type=int, default=max(1, round(0.1 * ORIGINAL_EPOCHS)))
    p.add_argument("--lr", type=float, default=0.01 * ORIGINAL_LR)
    p.add_argument("--optimizer", default="sgd", choices=sorted(qat.OPTIMIZERS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learn-amax", action="store_true")
    p.add_argument("--freeze-bn", action="store_true")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--onnx", action="store_true", help="export the QAT model, score it in ORT")
    p.add_argument("--dump-amax", action="store_true", help="write <out>/amax_rank<R>.json")
    p.add_argument("--out", type=Path, default=Path("runs/qat"))
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    fashion_mnist("train", args.data)  # decode once, fail early with the install hint
    train = fashion_mnist_loader("train", args.batch_size, shuffle=True, limit=args.limit_train,
                                 root=args.data, drop_last=True)
    calib_loader = fashion_mnist_loader("train", args.batch_size, shuffle=False,
                                        limit=args.limit_train, root=args.data)
    test = fashion_mnist_loader("test", 1000, shuffle=False, limit=args.limit_test,
                                root=args.data)

    results: dict = {"world_size": world, "device": str(device)}
    model = load_reference_model(args.checkpoint).to(device)
    results["fp32"] = top1(model, test, device) if rank == 0 else None
    log(f"FP32 top-1: {results['fp32']}")

    methods = [m.strip() for m in args.calib.split(",") if m.strip()]
    histogram = any(m != "max" for m in methods)
    desc = QuantDescriptor(calib_method="histogram") if histogram else None
    replace_modules(model, quant_desc_input=desc)
    t0 = time.perf_counter()
    try:
        found = calibrate(model, calib_loader, args.calib_batches, methods, device)
    except NotImplementedError as err:
        raise SystemExit(f"calibration method {args.calib}: {err}; use --calib max") from err
    results["calib_seconds"] = time.perf_counter() - t0
    ptq = {}
    for method, amax in found.items():
        set_amax(model, amax)
        ptq[method] = top1(model, test, device) if rank == 0 else None
        log(f"PTQ {method}: {ptq[method]}")
    results["ptq"] = ptq
    best = max(ptq, key=lambda m: ptq[m] or 0.0) if rank == 0 else methods[0]
    if world > 1:  # every rank starts QAT from rank 0's choice
        box = [best]
        dist.broadcast_object_list(box, src=0)
        best = box[0]
    set_amax(model, found[best])
    results["qat_from"] = best

    t0 = time.perf_counter()
    res = qat.finetune(
        model, train, lambda m: top1(m, test, device), epochs=args.epochs, lr=args.lr,
        optimizer=args.optimizer, learn_amax=args.learn_amax, freeze_bn=args.freeze_bn,
        device=device, checkpoint=args.out / "qat_best.pt", eval_before=False)
    results["qat_seconds"] = time.perf_counter() - t0
    results["qat"] = res.best_score
    results["qat_history"] = res.history
    log(f"QAT ({args.epochs} epochs, lr {args.lr}): {res.best_score:.2f} "
        f"(epoch {res.best_epoch}), {results['qat_seconds']:.0f} s")

    if args.dump_amax:
        dump = {name: q.amax.tolist() for name, q in quantizers(model) if q.amax is not None}
        dump["checkpoint_writes"] = res.checkpoint_writes
        (args.out / f"amax_rank{rank}.json").write_text(json.dumps(dump))
    if rank == 0:
        if args.onnx:
            check = onnx_check(model, test, args.out / "qat.onnx")
            results["onnx"] = check
            log(f"QAT ONNX in ONNX Runtime: {check['ort']:.2f} (PyTorch {check['torch']:.2f}, "
                f"{check['predictions_differing']} predictions differ, largest logit "
                f"difference {check['max_logit_diff']:.2e})")
        atomic_write(args.out / "results.json", json.dumps(results, indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
