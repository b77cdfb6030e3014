"""Train the Fashion-MNIST reference CNN (qdqapp.reference) in FP32.

Aims at >= 91% test accuracy with the default 6-epoch one-cycle schedule, sized for about
10 minutes on 2 CPU cores (``--device cpu --threads 2``; see BENCHMARKS.md for what was
measured). Progress is saved after every epoch next to the output (``<out>.state``) and
a rerun with ``--resume`` continues from it; ``--init`` starts from given weights.

    PYTHONPATH=. python scripts/train_reference.py --device cpu --threads 2 \
        --out runs/fmnist_resnet.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qdq.fileio import atomic_write
from qdqapp.data import fashion_mnist
from qdqapp.reference import build_reference_model


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random 2-pixel shifts (zero... i.e. background padding)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    background = float(x.min())
    padded = F.pad(x, (2, 2, 2, 2), value=background)
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
    return padded[:, :, dy:dy + 28, dx:dx + 28]


@torch.no_grad()
def evaluate(model, images, labels, device, batch_size=1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        out = model(images[i:i + batch_size].to(device))
        correct += (out.argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak SGD learning rate (one-cycle)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (idx .gz files)")
    p.add_argument("--out", type=Path, default=Path("runs/fmnist_resnet.pt"))
    p.add_argument("--resume", action="store_true", help="continue from <out>.state")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these weights (a state_dict), e.g. to finish a run")
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle",
                   help="onecycle: warm up then anneal; cosine: anneal from --lr only")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_x, train_y = fashion_mnist("train", args.data).tensors
    test_x, test_y = fashion_mnist("test", args.data).tensors
    model = build_reference_model()
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size
    total = args.epochs * steps_per_epoch
    if args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                    pct_start=0.25)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(args.seed)
    state_path = args.out.with_name(args.out.name + ".state")
    start, elapsed, best = 0, 0.0, 0.0
    if args.resume and state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        start, elapsed, best = int(st["epoch"]), float(st["elapsed"]), float(st["best"])
        print(f"resumed after epoch {start} ({elapsed:.0f} s, best {best:.2f}%)")

    print(f"device={device} threads={torch.get_num_threads()} epochs={args.epochs} "
          f"batch={args.batch_size} params={sum(p.numel() for p in model.parameters())}")
    for epoch in range(start, args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", leave=False,
                         mininterval=5, disable=not sys.stderr.isatty()):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(train_x[idx], gen).to(device, non_blocking=True)
            y = train_y[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, test_x, test_y, device)
        elapsed += time.perf_counter() - t0
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} "
              f"test {acc:.2f}% elapsed {elapsed:.0f} s", flush=True)
        if acc >= best:
            best = acc
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(args.out, partial(torch.save, weights))
        train_state = {"model": model.state_dict(), "opt": opt.state_dict(),
                       "sched": sched.state_dict(), "gen": gen.get_state(), "epoch": epoch + 1,
                       "elapsed": elapsed, "best": best}
        atomic_write(state_path, partial(torch.save, train_state))
    final = evaluate(model, test_x, test_y, device)
    print(f"final test accuracy {final:.2f}% in {elapsed:.0f} s of training -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
