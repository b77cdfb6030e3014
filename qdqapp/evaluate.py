"""Metrics a sweep can use as ``eval_fn``: top-1 accuracy, and agreement with FP32.

``--eval`` names the metric, the same in every command (higher is better):

===============  ==========================================================================
name             metric
===============  ==========================================================================
``auto``         ``top1`` for images and text classifiers, ``min-cosine`` for text encoders
``top1``         top-1 accuracy (%) on labelled data; top-1 agreement with FP32 (%) without
                 labels (random inputs, text classifiers)
``min-cosine``   text encoders: the lowest cosine similarity of a sentence's mean-pooled
                 embedding to its FP32 one, over the evaluation sentences
``mean-cosine``  text encoders: the same, averaged over the sentences
===============  ==========================================================================

Whether a sweep's metric can tell layers apart at all is checked once on the FP32 model
(:func:`metric_check`): its resolution (``100 / N`` for a top-1 metric over N samples)
goes to ``sensitivity.sweep``, and a model that predicts one class for (nearly) every
input (random weights do) is a warning of its own: top-1 cannot see what quantization
changes then.

Example::

    eval_fn = lambda m: top1_accuracy(m, test_loader, max_batches=20)
    report = sensitivity.sweep(model, eval_fn)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from qdqapp.errors import CliError
from sensitivity.batches import (
    ForwardFn,
    default_forward,
    model_device,
    split_labels,
    take,
    to_device,
)
from sensitivity.errors import SensitivityError

__all__ = ["top1_accuracy", "labelled_by_model", "evaluation", "text_evaluation",
           "check_eval", "TextMetric", "Top1Metric", "MetricCheck",
           "metric_check", "SWEEP_ADVICE", "EVALS", "TEXT_METRICS", "ACCURACY", "AGREEMENT",
           "default_max_drop"]

#: What to do when a sweep's metric cannot tell the layers apart, in the commands' terms.
SWEEP_ADVICE = ("use trained weights (a pretrained model or --checkpoint with its float "
                "state_dict) and real data (--data fashion-mnist, imagefolder:DIR or "
                "text:FILE) rather than random ones, more evaluation samples "
                "(--eval-batches), and for text models --eval mean-cosine, which has finer "
                "steps than top-1")
#: share of the inputs one FP32 class may take before top-1 is called blind
_ONE_CLASS = 0.9

ACCURACY = "top-1 accuracy (%)"
AGREEMENT = "top-1 agreement with FP32 (%)"

#: the ``--eval`` names every command takes
EVALS = ("auto", "top1", "min-cosine", "mean-cosine")
#: text metrics: ``--eval`` name -> (``TextAgreement`` metric, what reports call it)
TEXT_METRICS = {
    "min-cosine": ("min_cosine", "min cosine of mean-pooled embeddings vs FP32"),
    "mean-cosine": ("mean_cosine", "mean cosine of mean-pooled embeddings vs FP32"),
    "top1": ("top1", AGREEMENT),
}


def check_eval(name: str, text: bool, classifier: bool | None = None,
               label: str = "--eval") -> str:
    """An ``--eval`` name (``label`` is what the user called it) that fits the data
    (``text``: sentences for a text model) and, for text, the model (``classifier``:
    logits, None when not known yet). :func:`qdqapp.specs.parse_eval` calls it before any
    work; :func:`text_evaluation` again once the model's output shows its head."""
    if name not in EVALS:
        raise CliError(f"{label} {name!r}: choose one of {', '.join(EVALS)}")
    if not text and name in ("min-cosine", "mean-cosine"):
        raise CliError(f"{label} {name}: for text data only (the cosine of mean-pooled "
                       "sentence embeddings); image data is scored by top1")
    if text and classifier is True and name in ("min-cosine", "mean-cosine"):
        raise CliError(f"{label} {name}: the model has a classification head (logits); "
                       "use top1")
    if text and classifier is False and name == "top1":
        raise CliError(f"{label} top1: needs a classification head; this model gives "
                       "token embeddings (use min-cosine or mean-cosine)")
    return name


def default_max_drop(metric_name: str | None) -> float:
    """The allowed drop from FP32 when none is given: 0.3 points of a percentage, 0.005 of
    a cosine (a min cosine of 0.995)."""
    return 0.005 if metric_name and "cosine" in metric_name else 0.3


class TextMetric:
    """``eval_fn(model) -> float`` for text: a ``TextAgreement`` read as one number (top-1
    agreement in percent); ``last`` gives every number of the latest call."""

    def __init__(self, agreement, key: str) -> None:
        self.agreement = agreement
        self.key = key
        self.name = TEXT_METRICS[key][1]

    def __call__(self, model: nn.Module) -> float:
        value = self.agreement(model)
        return 100.0 * value if self.key == "top1" else value

    def of_loader(self, model: nn.Module, loader=None) -> float:
        """As ``qdq run`` calls an evaluation, ``fn(model, loader)``: the sentences are
        this metric's own, so the loader is not used."""
        return self(model)

    @property
    def last(self) -> dict[str, float | None]:
        score = self.agreement.last
        return score.as_dict() if score is not None else {}


@dataclass
class MetricCheck:
    """What a metric can resolve, found on the FP32 model: its smallest step (None when
    continuous or unknown) and warnings (the FP32 model predicts one class for nearly every
    input)."""

    resolution: float | None = None
    warnings: list[str] = field(default_factory=list)


def _class_warning(counts: Counter) -> list[str]:
    total = sum(counts.values())
    if not total:
        return []
    label, top = counts.most_common(1)[0]
    if top == total:
        return [f"the FP32 model predicts class {label} for every one of the {total} "
                "evaluation inputs, so top-1 cannot see what quantization changes (random "
                "weights do this)"]
    if top >= _ONE_CLASS * total:
        return [f"the FP32 model predicts class {label} for {top} of the {total} evaluation "
                f"inputs ({100 * top / total:.0f}%), so top-1 sees little of what "
                "quantization changes (random weights do this)"]
    return []


@dataclass
class Top1Metric:
    """``eval_fn(model) -> float``: top-1 accuracy (%) on ``batches``, ``(inputs, labels)``
    (the FP32 model's own predictions as labels make it top-1 agreement). ``batches`` is
    read again on every call."""

    batches: Iterable
    device: torch.device | str | None = None
    name: str = ACCURACY

    def __call__(self, model: nn.Module) -> float:
        return top1_accuracy(model, self.batches, self.device)

    def check(self, model: nn.Module) -> MetricCheck:
        """One pass of the FP32 model (quantizers off): the resolution ``100 / N`` and
        how many inputs its most frequent class takes."""
        return _top1_check(model, self.batches, self.device)


def _top1_check(model: nn.Module, batches: Iterable, device=None,
                max_batches: int | None = None) -> MetricCheck:
    from qdq.replace import disable_quantization

    target = torch.device(device) if device is not None else model_device(model)
    counts: Counter = Counter()
    was_training = model.training
    try:
        model.eval()
        with disable_quantization(model), torch.no_grad():
            for batch in take(batches, max_batches):
                batch = to_device(batch, target)
                predicted = _logits(default_forward(model, batch)).argmax(dim=-1)
                counts.update(predicted.reshape(-1).tolist())
    finally:
        model.train(was_training)
    total = sum(counts.values())
    return MetricCheck(100.0 / total if total else None, _class_warning(counts))


def metric_check(eval_fn, model: nn.Module, loader: Iterable | None = None,
                 device: torch.device | str | None = None,
                 max_batches: int | None = None) -> MetricCheck:
    """:class:`MetricCheck` of a sweep's metric: a :class:`Top1Metric` (or, with
    ``loader``, top-1 over that loader) runs the FP32 model once; a text top-1 agreement
    has one step per sentence and reads the FP32 classes it kept; the cosines and
    functions of the user's are taken as continuous."""
    if isinstance(eval_fn, Top1Metric):
        return eval_fn.check(model)
    if isinstance(eval_fn, TextMetric):
        if eval_fn.key != "top1":
            return MetricCheck()
        reference = eval_fn.agreement.reference  # the FP32 logits, one row per sentence
        counts = Counter(reference.argmax(dim=-1).reshape(-1).tolist())
        return MetricCheck(100.0 / eval_fn.agreement.sentences, _class_warning(counts))
    if loader is not None:
        return _top1_check(model, loader, device, max_batches)
    return MetricCheck()


def text_evaluation(source, model: nn.Module, name: str = "auto") -> TextMetric:
    """The text metric ``name`` on ``source``'s evaluation sentences, against ``model`` in
    FP32 (its quantizers disabled while the reference is computed)."""
    from qdqapp.hf import HFError, TextAgreement

    batches = list(source.eval_inputs())
    try:
        probe = TextAgreement(model, batches)
    except HFError as err:
        raise CliError(str(err)) from err
    check_eval(name, True, probe.classifier)
    key = name if name != "auto" else ("top1" if probe.classifier else "min-cosine")
    probe.metric = TEXT_METRICS[key][0]
    return TextMetric(probe, key)


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "out"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SensitivityError(f"cannot find logits in a model output of type "
                           f"{type(output).__name__}")


def top1_accuracy(model: nn.Module, data: Iterable, device: torch.device | str | None = None,
                  max_batches: int | None = None, forward_fn: ForwardFn | None = None
                  ) -> float:
    """Percent (0-100) of samples whose arg-max logit equals the label.

    ``data`` yields ``(inputs, labels)`` tuples or dicts with a label key. The model runs
    in eval mode without gradients; its mode is restored afterwards.
    """
    target = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or default_forward
    was_training = model.training
    correct = total = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in take(data, max_batches):
                batch = to_device(batch, target)
                labels = split_labels(batch)
                logits = _logits(forward(model, batch))
                correct += int((logits.argmax(dim=-1) == labels).sum())
                total += int(labels.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise SensitivityError("evaluation data is empty: the iterable gave no sample")
    return 100.0 * correct / total


def labelled_by_model(model: nn.Module, inputs: Iterable[torch.Tensor],
                      device: torch.device | str | None = None) -> list[tuple[torch.Tensor,
                                                                              torch.Tensor]]:
    """``(inputs, labels)`` batches whose labels are ``model``'s own FP32 predictions.

    With no labelled data at hand (random inputs, an unlabelled image folder),
    ``top1_accuracy`` on these batches measures top-1 agreement with the float model:
    100 for FP32 by construction, and the quantized model's drop below it.
    """
    from qdq.replace import disable_quantization

    target = torch.device(device) if device is not None else model_device(model)
    out = []
    was_training = model.training
    try:
        model.eval()
        with disable_quantization(model), torch.no_grad():
            for x in inputs:
                x = to_device(x, target)
                out.append((x, _logits(model(x)).argmax(dim=-1)))
    finally:
        model.train(was_training)
    return out


def evaluation(source, model: nn.Module, device: torch.device | str | None = None,
               agreement: bool = False, metric: str = "auto"):
    """``(eval_fn(model) -> metric, metric name)`` for a data source.

    Text gives :func:`text_evaluation` (``metric`` picks it). Labelled data gives top-1
    accuracy on its evaluation split; data without labels (random inputs), or
    ``agreement=True``, gives top-1 agreement with ``model`` in FP32 on its evaluation
    inputs. A sweep evaluates once per layer, so the batches are kept in memory when that
    is cheap (in-memory data, or ``--eval-batches`` set); image files are read again each
    time otherwise. ``metric`` is a checked ``--eval`` name (:func:`check_eval`).
    """
    if source.text:
        scorer = text_evaluation(source, model, metric)
        return scorer, scorer.name
    if source.labelled and not agreement:
        batches = source.eval()
        if source.in_memory or source.opts.eval_batches is not None:
            batches = list(batches)
        name = ACCURACY
    else:
        batches = labelled_by_model(model, source.eval_inputs(), device)
        name = AGREEMENT
    return Top1Metric(batches, device, name), name
