"""all-MiniLM-L6-v2: module-level placement against the rules with the residual identities
quantized (the placement ``residual_add`` gave transformers before it counted only convs).

Every Linear in INT8, SmoothQuant (alpha per layer), max calibration; min / mean cosine of
mean-pooled embeddings against FP32 on ``qdqapp/assets/text/test.txt``.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/minilm_residual.py
"""

from __future__ import annotations

import copy
import warnings

import torch

import sensitivity
from qdq import TensorQuantizer
from qdq.rules import apply_rules, attention_matmuls
from qdqapp.hf import (
    ASSETS,
    TextAgreement,
    load_text_model,
    minilm_folder,
    read_sentences,
    text_batches,
)


def quantize_residuals(model) -> int:
    """Quantize the identity input of every sublayer's residual add (``input_tensor`` of
    BertSelfOutput / BertOutput), as the rule did: one input quantizer per add."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in ("BertSelfOutput", "BertOutput"):
            module.residual_quantizer = TensorQuantizer()
            module.register_forward_pre_hook(
                lambda m, args: (args[0], m.residual_quantizer(args[1]), *args[2:]))
            count += 1
    return count


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    text = load_text_model(minilm_folder())
    calib = text_batches(text.tokenizer, read_sentences(ASSETS / "calib.txt"), batch_size=16)
    test = text_batches(text.tokenizer, read_sentences(ASSETS / "test.txt"), batch_size=16)
    metric = TextAgreement(text.model, test)
    for residuals in (False, True):
        model = apply_rules(copy.deepcopy(text.model), calib[0])
        added = quantize_residuals(model) if residuals else 0
        for _, mm in attention_matmuls(model):
            mm._input_quantizer.disable()
            mm._other_quantizer.disable()
        sensitivity.smoothquant(model, calib, progress=False)
        sensitivity.calibrate(model, calib, progress=False)
        label = f"{added} residual identities quantized" if residuals else "rules as they are"
        print(f"{label}: {metric.score(model)}", flush=True)


if __name__ == "__main__":
    main()
