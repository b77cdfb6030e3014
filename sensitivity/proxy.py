"""``proxy_ranking``: rank layers by local quantization error, in seconds, without labels.

One pass over a few batches with forward hooks: as each quantized layer runs, the hook
runs the same layer again on the same inputs with that layer's quantizers switched off
and compares the two outputs. The upstream layers stay quantized, so each layer is seen
with the inputs it meets in deployment. Per layer it reports the SQNR

    SQNR = 10 log10( sum(y_float^2) / sum((y_int8 - y_float)^2) )   [dB]

and the output MSE. A low SQNR marks a layer that quantization hurts; the exact sweep
says whether the task metric notices, and :func:`spearman` says how well they agree.

Example::

    proxy = sensitivity.proxy_ranking(model, calib_loader, num_batches=4)
    print(proxy.ranking()[:5])
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.fileio import atomic_write
from qdq.provenance import provenance, provenance_line
from sensitivity.batches import ForwardFn, default_forward, model_device, take, to_device
from sensitivity.errors import SensitivityError
from sensitivity.layers import Layer, enabled_quantizers, find_layers, saved_states, select_layers

__all__ = ["proxy_ranking", "ProxyReport", "ProxyRow", "spearman"]


@dataclass
class ProxyRow:
    layer: str
    sqnr_db: float | None
    mse: float | None
    elements: int = 0

    @property
    def reached(self) -> bool:
        return self.elements > 0


@dataclass
class ProxyReport:
    """Per-layer SQNR and output MSE; ``ranking()`` lists the most sensitive first."""

    rows: list[ProxyRow]
    num_batches: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: :func:`qdq.provenance.provenance` of the ranking (filled when written if missing)
    provenance: dict[str, Any] | None = None

    def ranked(self) -> list[ProxyRow]:
        reached = sorted((r for r in self.rows if r.reached), key=lambda r: r.sqnr_db)
        return reached + [r for r in self.rows if not r.reached]

    def ranking(self) -> list[str]:
        return [r.layer for r in self.ranked() if r.reached]

    def scores(self) -> dict[str, float]:
        """Layer -> sensitivity score (negated SQNR: larger means more sensitive)."""
        return {r.layer: -r.sqnr_db for r in self.rows if r.reached}

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.ranked():
            d = asdict(r)
            if d["sqnr_db"] is not None and math.isinf(d["sqnr_db"]):
                d["sqnr_db"] = None  # exact (no error); JSON has no infinity
            rows.append(d)
        return {"num_batches": self.num_batches, "seconds": self.seconds, "rows": rows,
                **self.extra, "provenance": self.provenance}

    def as_rows(self) -> list[dict[str, Any]]:
        """Ranked rows as plain dicts (JSON-ready)."""
        return self.to_dict()["rows"]

    def markdown(self) -> str:
        lines = [f"# Proxy ranking (SQNR of each layer's output, {self.num_batches} batches, "
                 f"{self.seconds:.1f} s)", "", "| rank | layer | SQNR dB | output MSE |",
                 "|---:|---|---:|---:|"]
        for i, r in enumerate(self.ranked(), 1):
            if r.reached:
                lines.append(f"| {i} | `{r.layer}` | {r.sqnr_db:.2f} | {r.mse:.3e} |")
            else:
                lines.append(f"| - | `{r.layer}` | not reached by the data | |")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> Path:
        """``proxy.json`` and ``proxy.md`` in ``folder``, written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.provenance is None:
            self.provenance = provenance()
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        atomic_write(folder / "proxy.json", text)
        md = self.markdown() + "\n" + provenance_line(self.provenance) + "\n"
        atomic_write(folder / "proxy.md", md)
        return folder


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


class _Probe:
    """Forward hooks that re-run each layer in float and accumulate the error."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.busy = False
        self.signal = [0.0] * len(layers)
        self.noise = [0.0] * len(layers)
        self.count = [0] * len(layers)
        self.handles = []
        for i, layer in enumerate(layers):
            for module in layer.modules:
                self.handles.append(module.register_forward_hook(
                    self._hook(i, layer), with_kwargs=True))

    def _hook(self, i: int, layer: Layer):
        def hook(module: nn.Module, args, kwargs, output):
            if self.busy:
                return None
            self.busy = True
            try:
                with saved_states(layer.quantizers), torch.no_grad():
                    layer.disable()
                    reference = module(*args, **kwargs)
            finally:
                self.busy = False
            for y, r in zip(_tensors(output), _tensors(reference), strict=False):
                r64 = r.detach().double()
                self.signal[i] += float((r64 * r64).sum())
                self.noise[i] += float(((y.detach().double() - r64) ** 2).sum())
                self.count[i] += r.numel()
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def proxy_ranking(model: nn.Module, data: Iterable, num_batches: int | None = 4,
                  layers: Iterable[str] | None = None, device: torch.device | str | None = None,
                  progress: bool = True, forward_fn: ForwardFn | None = None) -> ProxyReport:
    """Per-layer SQNR (dB) and output MSE of a calibrated model on a few batches.

    No ``eval_fn`` and no labels are needed; the model runs once per batch plus once more
    per layer, so it takes seconds where a sweep takes one full evaluation per layer.
    """
    if not enabled_quantizers(model):
        raise SensitivityError("the model has no enabled quantizers: insert and calibrate "
                               "them before ranking layers")
    chosen = select_layers(find_layers(model), layers)
    target = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or default_forward
    was_training = model.training
    probe = _Probe(chosen)
    start = time.perf_counter()
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(take(data, num_batches), total=num_batches, desc="proxy",
                              unit="batch", disable=not progress, leave=False):
                forward(model, to_device(batch, target))
                batches += 1
    finally:
        probe.remove()
        model.train(was_training)
    if batches == 0:
        raise SensitivityError("proxy data is empty: the iterable gave no batch")
    rows = []
    for i, layer in enumerate(chosen):
        n = probe.count[i]
        if n == 0:
            rows.append(ProxyRow(layer.name, None, None, 0))
            continue
        noise, signal = probe.noise[i], probe.signal[i]
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0
                                            else -math.inf)
        rows.append(ProxyRow(layer.name, sqnr, noise / n, n))
    return ProxyReport(rows, batches, time.perf_counter() - start,
                       provenance=provenance(model_device(model)))


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman rank correlation of two score maps over the keys they share."""
    keys = [k for k in a if k in b]
    if len(keys) < 2:
        raise SensitivityError(f"rank correlation needs two shared layers, got {len(keys)}")
    ra, rb = _ranks([a[k] for k in keys]), _ranks([b[k] for k in keys])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    if va == 0 or vb == 0:
        return float("nan")  # one side is all ties: no ranking to compare
    return cov / (va * vb)
