"""Quantization-aware fine-tuning of a calibrated model, on one device or under DDP.

The recipe (NVIDIA's, for models already calibrated with PTQ): train for about 10% of the
original schedule, starting at about 1% of the original learning rate and decaying it to
zero on a cosine; gradients pass the fake-quant nodes straight through (inside the
clipping range, zero outside). Optionally amax becomes trainable (``learn_amax``) and the
BatchNorm running statistics are frozen (``freeze_bn``) so the calibrated ranges keep
matching the activations they were measured on.

Under ``torch.distributed`` (``torchrun``) the model is wrapped in DDP, the data is split
across ranks like a ``DistributedSampler`` does, only rank 0 writes files, and amax is
checked to be identical on every rank at the end. amax is a buffer, which DDP broadcasts
from rank 0 at every forward; a learnable amax is a Parameter whose gradient DDP averages.

Example::

    result = finetune(model, train_loader, lambda m: top1(m, test_loader), epochs=1,
                      lr=1e-3, checkpoint="runs/qat_best.pt")
    print(result.best_score, result.best_epoch)

Checkpoints are plain dicts of tensors, strings and numbers, loaded with
``torch.load(weights_only=True)``: :func:`save_checkpoint` / :func:`load_checkpoint`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qdq.fileio import atomic_write
from qdq.replace import quantizers

__all__ = [
    "CHECKPOINT_FORMAT", "CheckpointError", "QATResult", "finetune", "save_checkpoint",
    "load_checkpoint", "amax_mismatches", "freeze_batchnorm", "OPTIMIZERS",
]

CHECKPOINT_FORMAT = "qdq.quantized_state/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or not made for this model; names the file."""


# ------------------------------------------------------------------- checkpoints
def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra) -> Path:
    """Write the quantized model's state atomically: weights, BN statistics and amax (the
    ``state_dict``) plus each quantizer's on/off switches, so a model rebuilt from it
    quantizes, and exports, the same way. ``extra`` holds plain values (epoch, score)."""
    model = _unwrap(model)
    switches = {name: list(q.get_state()) + [q.learn_amax] for name, q in quantizers(model)}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": _cpu_state(model),
               "quantizers": switches, "extra": dict(extra)}
    path = Path(path)
    atomic_write(path, partial(torch.save, payload))
    return path


def _read(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; one message
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: cannot be read, truncated or not a torch "
                              f"checkpoint ({first[:200]})") from err


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a :func:`save_checkpoint` file into ``model`` (built and quantized the same way:
    same layers, same quantizers). Returns the ``extra`` values saved with it."""
    path = Path(path)
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        what = payload.get("format", "no format tag") if isinstance(payload, dict) else \
            type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: not a qdq quantized-model checkpoint "
                              f"(found {what!r}, expected {CHECKPOINT_FORMAT!r})")
    model = _unwrap(model)
    own = dict(quantizers(model))
    saved = payload.get("quantizers", {})
    unknown = sorted(set(saved) - set(own))
    absent = sorted(set(own) - set(saved))
    if unknown or absent:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: quantizers "
            + ", ".join(filter(None, [f"only in the checkpoint: {unknown[:4]}" if unknown else "",
                                      f"only in the model: {absent[:4]}" if absent else ""])))
    for name, (disabled, if_quant, if_calib, learn) in saved.items():
        q = own[name]
        if learn and not q.learn_amax:
            # The learned amax must come back as a Parameter; any value works as a seed,
            # the state_dict overwrites it.
            key = f"{name}._amax"
            q.amax = payload["state_dict"][key].clamp_min(1e-12)
            q.init_learn_amax()
        q.set_state((bool(disabled), bool(if_quant), bool(if_calib)))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit this model: "
                              f"{' '.join(line.strip() for line in first[:2])[:300]}") from err
    return dict(payload.get("extra", {}))


# --------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm in eval mode (running statistics stop moving); returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            count += 1
    return count


def amax_mismatches(model: nn.Module) -> list[str]:
    """Names of quantizers whose amax differs from rank 0's (empty when not distributed)."""
    rank, world = _dist()
    if world == 1:
        return []
    bad = []
    for name, q in quantizers(_unwrap(model)):
        amax = q.amax
        if amax is None:
            continue
        mine = amax.detach().float().clone()
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(mine, ref):
            bad.append(name)
    flag = torch.tensor([len(bad)], device=_comm_device())
    dist.all_reduce(flag)
    if int(flag) and not bad:
        bad.append(f"(on another rank than {rank})")
    return bad


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Shard:
    """Every ``world``-th batch of an iterable, starting at ``rank`` (no DataLoader)."""

    def __init__(self, data: Iterable, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.data)  # type: ignore[arg-type]
        return n // self.world + (1 if self.rank < n % self.world else 0)


def _shard(train_data, rank: int, world: int, seed: int):
    """Split the training data across ranks, the way a DistributedSampler does."""
    if world == 1:
        return train_data, None
    if isinstance(train_data, torch.utils.data.DataLoader):
        sampler = torch.utils.data.DistributedSampler(
            train_data.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loader = torch.utils.data.DataLoader(
            train_data.dataset, batch_size=train_data.batch_size, sampler=sampler,
            num_workers=train_data.num_workers, collate_fn=train_data.collate_fn,
            pin_memory=train_data.pin_memory, drop_last=train_data.drop_last)
        return loader, sampler
    if isinstance(train_data, torch.utils.data.Dataset) and hasattr(train_data, "__len__"):
        raise TypeError("finetune: pass a DataLoader (or an iterable of batches), not a Dataset")
    return _Shard(train_data, rank, world), None


#: name -> factory(params, lr, momentum, weight_decay)
OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=momentum > 0),
    "adamw": lambda params, lr, momentum, wd: torch.optim.AdamW(
        params, lr=lr, weight_decay=wd),
}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    amax_ids = {id(q._amax) for _, q in quantizers(model) if q.learn_amax}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in amax_ids]
    amax = [p for p in model.parameters() if id(p) in amax_ids]
    groups = [{"params": plain, "weight_decay": weight_decay}]
    if amax:
        groups.append({"params": amax, "weight_decay": 0.0})  # ranges must not shrink to 0
    return groups


def _to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


@dataclass
class QATResult:
    """What :func:`finetune` did: one ``(epoch, score, mean loss)`` per epoch."""

    history: list[tuple[int, float, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    initial_score: float | None = None
    checkpoint: Path | None = None
    checkpoint_writes: int = 0
    resumed_from: int = 0


# ---------------------------------------------------------------------- finetune
def finetune(
    model: nn.Module,
    train_data: Iterable,
    eval_fn: Callable[[nn.Module], float],
    epochs: int,
    lr: float,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    min_lr_ratio: float = 0.0,
    loss_fn: Callable = F.cross_entropy,
    learn_amax: bool = False,
    freeze_bn: bool | int = False,
    amp: bool | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    restore_best: bool = True,
    eval_before: bool = True,
    max_steps_per_epoch: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> QATResult:
    """Fine-tune a calibrated, quantized ``model`` with fake quantization in the loop.

    Args:
        train_data: a DataLoader (re-sharded with a DistributedSampler under DDP) or any
            iterable of ``(inputs, targets)`` batches (every world-th batch per rank).
        eval_fn: ``eval_fn(model) -> score``, higher is better (e.g. top-1 %); called on
            the unwrapped model in eval mode after every epoch, on rank 0 only.
        epochs, lr: about 10% of the original epochs and 1% of its initial lr.
        optimizer: a key of :data:`OPTIMIZERS` (``"sgd"`` with momentum, ``"adamw"``).
        min_lr_ratio: the cosine decays from ``lr`` to ``lr * min_lr_ratio``.
        learn_amax: make amax of every calibrated per-tensor quantizer trainable.
        freeze_bn: ``True`` freezes BatchNorm statistics from the start; an int ``k``
            freezes them from epoch ``k`` (0-based) on.
        amp: bf16 autocast; defaults to on for CUDA, off on the CPU.
        checkpoint: where the best model goes (:func:`save_checkpoint`); the training
            state goes next to it (``<checkpoint>.state``) after every epoch and a rerun
            with ``resume=True`` continues from there.
        restore_best: load the best weights back into ``model`` at the end.
        max_steps_per_epoch: cap the batches per epoch (quick runs).

    Returns a :class:`QATResult`. Raises ``RuntimeError`` if amax ends up differing
    between ranks.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
    rank, world = _dist()
    core = _unwrap(model)
    if device is None:
        if world > 1 and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = next(core.parameters()).device
    device = torch.device(device)
    core.to(device)
    if learn_amax:
        for _, q in quantizers(core):
            if q.amax is not None and q.amax.numel() == 1 and not q.learn_amax:
                q.init_learn_amax()
    use_amp = (device.type == "cuda") if amp is None else bool(amp)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_amp
                else nullcontext())

    net: nn.Module = core
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(core, device_ids=ids, broadcast_buffers=True)
    loader, sampler = _shard(train_data, rank, world, seed)
    try:
        steps = len(loader)
    except TypeError as err:
        raise TypeError("finetune: train_data must have a length (for the lr schedule)") from err
    if max_steps_per_epoch is not None:
        steps = min(steps, max_steps_per_epoch)
    if steps == 0:
        raise ValueError("finetune: train_data yields no batch on this rank")

    opt = OPTIMIZERS[optimizer](_param_groups(core, weight_decay), lr, momentum, weight_decay)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(
            math.pi * min(s, total) / total)))

    result = QATResult()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    state_path = ckpt.with_name(ckpt.name + ".state") if ckpt is not None else None
    start = 0
    if resume and state_path is not None and state_path.is_file():
        st = _read(state_path)
        if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT + "+train":
            raise CheckpointError(f"training state {state_path}: not written by finetune")
        core.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start = int(st["epoch"])
        result.best_score, result.best_epoch = float(st["best_score"]), int(st["best_epoch"])
        result.history = [tuple(h) for h in st["history"]]
        result.resumed_from = start
    result.checkpoint = ckpt

    def evaluate() -> float:
        score = torch.zeros(1, dtype=torch.float64)
        if rank == 0:
            core.eval()
            with torch.no_grad():
                score[0] = float(eval_fn(core))
        if world > 1:
            buf = score.to(_comm_device())
            dist.broadcast(buf, src=0)
            score = buf.cpu()
        return float(score[0])

    best_state: dict[str, torch.Tensor] | None = None
    if eval_before and start == 0:
        result.initial_score = evaluate()
        result.best_score = result.initial_score
        best_state = _cpu_state(core)
        if rank == 0 and ckpt is not None:
            save_checkpoint(core, ckpt, epoch=0, score=result.initial_score)
            result.checkpoint_writes += 1

    for epoch in range(start, epochs):
        net.train()
        if freeze_bn is True or (not isinstance(freeze_bn, bool) and epoch >= int(freeze_bn)):
            freeze_batchnorm(core)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(total=steps, desc=f"QAT epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not progress or rank != 0 or not sys.stderr.isatty())
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            inputs, targets = _to(batch, device)
            with autocast:
                loss = loss_fn(net(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().float()
            seen += 1
            bar.update()
        bar.close()
        mean_loss = float(loss_sum) / max(seen, 1)
        score = evaluate()
        result.history.append((epoch + 1, score, mean_loss))
        if score > result.best_score:
            result.best_score, result.best_epoch = score, epoch + 1
            best_state = _cpu_state(core)
            if rank == 0 and ckpt is not None:
                save_checkpoint(core, ckpt, epoch=epoch + 1, score=score)
                result.checkpoint_writes += 1
        if rank == 0 and state_path is not None:
            train_state = {
                "format": CHECKPOINT_FORMAT + "+train", "model": _cpu_state(core),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch + 1, "best_score": result.best_score,
                "best_epoch": result.best_epoch, "history": [list(h) for h in result.history],
            }
            atomic_write(state_path, partial(torch.save, train_state))
        if world > 1:
            dist.barrier()

    last = result.history[-1][0] if result.history else 0
    if restore_best and result.best_epoch != last:
        if best_state is not None:
            core.load_state_dict(best_state)
        elif ckpt is not None and ckpt.is_file():  # resumed: the best lives in the file
            load_checkpoint(core, ckpt)
    core.eval()
    bad = amax_mismatches(core)
    if bad:
        raise RuntimeError(f"amax differs between ranks after QAT for {len(bad)} quantizers, "
                           f"first: {bad[:3]}")
    return result
