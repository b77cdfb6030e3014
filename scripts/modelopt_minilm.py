"""NVIDIA modelopt on a transformers encoder, for side-by-side benchmarks only.

Run by ``scripts/minilm_ptq.py`` with the Python of an environment that has modelopt
(``--modelopt-python``); it imports neither qdq nor anything of this project, so the two
environments stay apart. It reads one ``torch.save`` file::

    {"folder": model folder, "calib": [batch, ...], "test": [batch, ...],
     "percentiles": [99.9, 99.99, ...]}

(batches are ``{"input_ids", "attention_mask"}`` dicts) and writes another with the
mean-pooled test embeddings of every configuration it ran, keyed by name, plus the FP32
embeddings as modelopt's environment computes them and, per percentile, the amax of every
Linear's input quantizer (``amax_percentile_P``: module path -> amax).
``EXTRA_SITE_PACKAGES`` is appended to ``sys.path`` (after the environment's own
packages), for transformers when the modelopt environment lacks it.

    python scripts/modelopt_minilm.py IN.pt OUT.pt [EXTRA_SITE_PACKAGES]
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def _embed(model, batches) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(rows)


def _linear_only(model, mtq_nn) -> int:
    """Disable every modelopt quantizer whose parent is not an nn.Linear."""
    off = 0
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear):
            continue
        for child in module.children():
            if isinstance(child, mtq_nn.TensorQuantizer) and child.is_enabled:
                child.disable()
                off += 1
    return off


def main(src: str, dst: str, extra_path: str | None = None) -> None:
    if extra_path:
        sys.path.append(extra_path)  # after this environment's own packages
    import modelopt.torch.quantization as mtq
    import modelopt.torch.quantization.nn as mtq_nn
    from transformers import AutoModel

    job = torch.load(src, weights_only=True)
    base = AutoModel.from_pretrained(job["folder"], local_files_only=True,
                                     attn_implementation="eager").eval()
    calib, test = job["calib"], job["test"]

    def loop(model):
        with torch.no_grad():
            for batch in calib:
                model(**batch)

    results = {"fp32": _embed(base, test)}

    def run(name, cfg, linear_only):
        model = mtq.quantize(copy.deepcopy(base), copy.deepcopy(cfg), loop)
        if linear_only:
            _linear_only(model, mtq_nn)
        results[name] = _embed(model, test)
        print(f"modelopt {name}: done", flush=True)

    run("int8_default_linear", mtq.INT8_DEFAULT_CFG, True)
    run("int8_default_unmodified", mtq.INT8_DEFAULT_CFG, False)
    # histogram calibration: modelopt's max algorithm cannot finish histogram statistics,
    # so collect them by hand once and load each percentile from them
    hist = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    hist["algorithm"] = None
    for entry in hist["quant_cfg"]:
        if entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
            entry["cfg"] = dict(entry["cfg"], calibrator="histogram")
    model = mtq.quantize(copy.deepcopy(base), hist, None)
    _linear_only(model, mtq_nn)
    named = [(n, q) for n, q in model.named_modules()
             if isinstance(q, mtq_nn.TensorQuantizer) and q.is_enabled]
    quantizers = [q for _, q in named]
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    loop(model)
    for p in job["percentiles"]:
        for q in quantizers:
            if type(q._calibrator).__name__ == "HistogramCalibrator":
                q.load_calib_amax("percentile", percentile=p)
            else:
                q.load_calib_amax()
            q.enable_quant()
            q.disable_calib()
        results[f"histogram_percentile_{p}"] = _embed(model, test)
        # the Linear input amax, by module path, for an amax-level comparison
        results[f"amax_percentile_{p}"] = {
            n.rsplit(".", 1)[0]: float(q.amax) for n, q in named
            if n.endswith("input_quantizer") and q.amax is not None}
        print(f"modelopt histogram percentile {p}: done", flush=True)
    run("int8_smoothquant_linear", mtq.INT8_SMOOTHQUANT_CFG, True)
    run("int8_smoothquant_unmodified", mtq.INT8_SMOOTHQUANT_CFG, False)
    torch.save(results, dst)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: modelopt_minilm.py IN.pt OUT.pt [EXTRA_SITE_PACKAGES]")
    main(*sys.argv[1:])
