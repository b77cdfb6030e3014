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

Optional keys of the input file choose another suite (``scripts/bench_weight_methods.py``):

- ``"suite": "weights"``: weight-only INT4 on MiniLM's Linear layers instead of the INT8
  suite, for every block size in ``"blocks"`` (default ``[128, 32]``) and every method in
  ``"methods"`` (default: all of :data:`WEIGHT_METHODS`; ``gptq`` only where this modelopt
  has it), embeddings keyed ``w4_b{block}_{method}`` (``errors``: name -> message for a
  method that failed);
- ``"smoothquant_repeats": N``: also time INT8_SMOOTHQUANT_CFG on the Linears N times
  (``smoothquant_seconds``: a list; the last one's embeddings as
  ``int8_smoothquant_linear``); with ``"suite": "smoothquant"``, only that;
- ``"threads": N``: ``torch.set_num_threads(N)``.

- ``"timings": True``: the output also holds ``seconds`` (name -> wall time of the
  ``mtq.quantize`` call: module replacement, calibration and the algorithm; not the
  scoring) and ``versions`` (modelopt, torch, transformers, threads); the weights suite
  implies it.

    python scripts/modelopt_minilm.py IN.pt OUT.pt [EXTRA_SITE_PACKAGES]
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from torch import nn

#: weight-only INT4 methods: name -> modelopt ``algorithm`` (``awq_lite`` is INT4_AWQ_CFG's
#: own, with its alpha step of 0.1). Every one quantizes the weights block-wise (one scale
#: per ``block`` inputs); ``max`` and ``mse`` choose the scales only, the AWQ methods
#: also scale input channels (lite: a per-layer alpha; clip: a searched clip per block;
#: full: both), GPTQ also moves the rounded weights by second-order error feedback.
WEIGHT_METHODS = {
    "max": "max",
    "mse": {"method": "mse"},
    "awq_lite": {"method": "awq_lite", "alpha_step": 0.1},
    "awq_clip": {"method": "awq_clip"},
    "awq_full": {"method": "awq_full", "alpha_step": 0.1},
    "gptq": {"method": "gptq"},
}


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


def int4_config(mtq, block: int, algorithm) -> dict:
    """INT4_AWQ_CFG (weights INT4 block-wise, inputs float) with ``block`` inputs per
    scale and ``algorithm`` in place of its awq_lite."""
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    found = 0
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            entry["cfg"] = dict(entry["cfg"], num_bits=4,
                                block_sizes={-1: block, "type": "static"})
            found += 1
    if found != 1:
        raise SystemExit(f"INT4_AWQ_CFG has {found} '*weight_quantizer' entries; expected 1")
    cfg["algorithm"] = copy.deepcopy(algorithm)
    return cfg


def main(src: str, dst: str, extra_path: str | None = None) -> None:
    if extra_path:
        sys.path.append(extra_path)  # after this environment's own packages
    import modelopt
    import modelopt.torch.quantization as mtq
    import modelopt.torch.quantization.nn as mtq_nn
    from transformers import AutoModel

    job = torch.load(src, weights_only=True)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    base = AutoModel.from_pretrained(job["folder"], local_files_only=True,
                                     attn_implementation="eager").eval()
    calib, test = job["calib"], job["test"]

    def loop(model):
        with torch.no_grad():
            for batch in calib:
                model(**batch)

    results = {"fp32": _embed(base, test), "seconds": {},
               "versions": {"modelopt": str(modelopt.__version__),
                            "torch": str(torch.__version__),
                            "transformers": str(sys.modules["transformers"].__version__),
                            "threads": torch.get_num_threads()}}

    def quantize(cfg, linear_only):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        model = mtq.quantize(model, copy.deepcopy(cfg), loop)
        seconds = time.perf_counter() - start
        if linear_only:
            _linear_only(model, mtq_nn)
        return model, seconds

    def run(name, cfg, linear_only):
        model, results["seconds"][name] = quantize(cfg, linear_only)
        results[name] = _embed(model, test)
        print(f"modelopt {name}: {results['seconds'][name]:.2f} s", flush=True)

    repeats = int(job.get("smoothquant_repeats", 0))
    if repeats:
        results["smoothquant_seconds"] = []
        for _ in range(repeats):
            model, seconds = quantize(mtq.INT8_SMOOTHQUANT_CFG, True)
            results["smoothquant_seconds"].append(seconds)
        results["int8_smoothquant_linear"] = _embed(model, test)
        print("modelopt INT8_SMOOTHQUANT_CFG: " + ", ".join(
            f"{t:.2f}" for t in results["smoothquant_seconds"]) + " s", flush=True)
    if job.get("suite") == "smoothquant":
        torch.save(results, dst)
        return
    if job.get("suite", "int8") == "weights":
        for block in job.get("blocks", [128, 32]):
            for method in job.get("methods", list(WEIGHT_METHODS)):
                if method == "gptq" and not hasattr(mtq.config, "GPTQCalibConfig"):
                    print("modelopt has no GPTQ: skipped", flush=True)
                    continue
                name = f"w4_b{block}_{method}"
                try:  # one method failing leaves the others' rows
                    run(name, int4_config(mtq, block, WEIGHT_METHODS[method]), True)
                except Exception as err:  # noqa: BLE001 - reported in the output
                    results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
                    print(f"modelopt {name}: failed ({err})", flush=True)
        torch.save(results, dst)
        return

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
    if not job.get("timings"):  # the INT8 suite's output as scripts/minilm_ptq.py reads it
        del results["seconds"], results["versions"]
    torch.save(results, dst)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: modelopt_minilm.py IN.pt OUT.pt [EXTRA_SITE_PACKAGES]")
    main(*sys.argv[1:])
