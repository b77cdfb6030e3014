"""``report.md`` (with ``report.html`` rendered from it) and ``summary.json`` of a run.

The report leads with the answer (the format, the metric, FP32 vs the quantized model, what
was kept in float, how big the ONNX file is and whether it checks out), then the evidence:
SmoothQuant, calibrators, sensitivity ranking, partial quantization, per-layer SQNR, export,
lint, ONNX Runtime and TensorRT. Stages a format has no use for read "skipped" with the
reason. The metric is named wherever a number of it appears (``state.json`` keeps its name
and the digits it is printed with); text models show the min and the mean cosine. A failed
check reads FAILED in the printed table, in report.md/html and in summary.json
(``"status": "FAILED"`` and the reasons in ``"failed_checks"``), and makes ``qdq run``
exit with status 1. A sweep whose metric cannot tell the layers apart reads WARNING in
the table, the report and ``"sweep_warnings"``. report.md/html and summary.json say when,
with which command and qdq version, and on which machine and device they were written
(:mod:`qdq.provenance`).
"""

from __future__ import annotations

import html
import json
from typing import Any

from qdq.provenance import provenance, provenance_line
from qdqapp.formats import FormatChoice, size_text
from qdqapp.pipeline.config import RunConfig
from qdqapp.pipeline.folder import RunFolder

__all__ = ["write_report", "summary_table", "summary", "failed_checks"]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metric_info(folder: RunFolder) -> dict[str, Any]:
    return folder.state.get("metric") or {}


def _digits(folder: RunFolder) -> int:
    return int(_metric_info(folder).get("digits", 2))


def _scores(result: dict[str, Any], key: str | None = None) -> str:
    """The numbers of a text result the metric itself does not show: `` (mean 0.9978)``
    beside a min cosine, `` (min 0.9951, mean 0.9978)`` beside a top-1 agreement."""
    scores = result.get("scores") or {}
    if scores.get("min_cosine") is None:
        return ""
    shown = [("min", "min_cosine"), ("mean", "mean_cosine")]
    rest = [f"{label} {scores[k]:.4f}" for label, k in shown if k.replace("_", "-") != key]
    return f" ({', '.join(rest)})"


def _smoothquant(folder: RunFolder):
    path = folder.path("smoothquant.json")
    if not path.is_file():
        return None
    from sensitivity.smoothquant import SmoothQuantReport

    return SmoothQuantReport.from_dict(json.loads(path.read_text()))


def _status_line(folder: RunFolder, stage: str) -> str:
    status = folder.status(stage)
    if status == "skipped":
        return f"skipped: {folder.result(stage).get('reason', '')}"
    return status


def failed_checks(folder: RunFolder) -> list[str]:
    """The checks that failed, one phrase each (empty when all passed or were skipped)."""
    failed = []
    lint = folder.result("lint")
    if folder.status("lint") == "done" and lint.get("errors"):
        failed.append(f"Q/DQ lint found {lint['errors']} errors (lint.json)")
    check = folder.result("onnx_check")
    if folder.status("onnx_check") == "done" and not check.get("ok", True):
        failed.append("ONNX Runtime disagrees with PyTorch beyond rounding-boundary flips "
                      "(onnx_check.txt)")
    return failed


def _metric(folder: RunFolder, stage: str) -> Any:
    """A stage's metric, or why there is none."""
    if folder.status(stage) == "skipped":
        return f"skipped: {folder.result(stage).get('reason', '')}"
    return folder.result(stage).get("metric")


def _onnx_size(exp: dict[str, Any]) -> str:
    """The export stage's file size and compression, in words."""
    return size_text(exp["bytes"], exp.get("fp32_bytes") or exp["bytes"])


def summary(folder: RunFolder, choice: FormatChoice | None = None) -> dict[str, Any]:
    """The headline numbers, also written as ``summary.json``. ``quantized_metric`` is the
    model in its format with every layer quantized (``int8_metric``, its older name, is
    kept beside it)."""
    choice = choice or FormatChoice()
    r = folder.result
    fp32, int8, partial, qat = r("fp32"), r("int8"), r("partial"), r("qat")
    check, lint = r("onnx_check"), r("lint")
    final = qat.get("metric", partial.get("metric", int8.get("metric")))
    failed = failed_checks(folder)
    if folder.status("onnx_check") == "done" and check.get("cosine_vs_pytorch"):
        vs, ort = check["cosine_vs_pytorch"], check.get("ort_scores") or {}
        onnx_line = (f"same function (forced run rel L2 {check.get('forced_rel_l2') or 0:.1e}"
                     f", {check.get('rounding_flips', 0)} boundary flips); free run cosine "
                     f"with PyTorch min {vs['min']:.5f}, mean {vs['mean']:.5f}; ORT vs FP32 "
                     f"min cosine {ort.get('min_cosine', float('nan')):.4f}, mean "
                     f"{ort.get('mean_cosine', float('nan')):.4f}")
        if ort.get("top1") is not None:
            onnx_line += f", top-1 agreement {100 * ort['top1']:.2f}%"
        if not check.get("ok", True):
            onnx_line = f"FAILED: {onnx_line}; see onnx_check.txt"
    elif folder.status("onnx_check") == "done":
        onnx_line = (f"rel L2 {check.get('rel_l2', float('nan')):.1e}, top-1 agreement with "
                     f"PyTorch {_fmt(check.get('top1_agreement'))}%")
        if check.get("ort_metric") is not None:
            onnx_line += f", ORT accuracy {check['ort_metric']:.2f}"
        if not check.get("ok", True):
            onnx_line = f"FAILED: {onnx_line}; see onnx_check.txt"
    else:
        onnx_line = _status_line(folder, "onnx_check")
    lint_line = (f"{lint.get('errors', 0)} errors, {lint.get('warnings', 0)} warnings"
                 if folder.status("lint") == "done" else _status_line(folder, "lint"))
    if folder.status("lint") == "done" and lint.get("errors"):
        lint_line = f"FAILED: {lint_line}; see lint.json"
    if folder.status("tensorrt") == "done":
        trt = folder.result("tensorrt")
        engine_line = (f"built: {100 * trt.get('int8_fraction', 0):.0f}% of layers in INT8, "
                       f"p50 {_fmt(trt.get('latency_ms_p50'), 3)} ms, "
                       f"{_fmt(trt.get('speedup_vs_fp16'))}x vs FP16 (engine.txt)")
    else:
        engine_line = _status_line(folder, "tensorrt")
    exp = r("export") if folder.status("export") == "done" else {}
    smooth = _smoothquant(folder)
    return {
        "status": "FAILED" if failed else "ok",
        "failed_checks": failed,
        **choice.as_dict(),
        "metric": _metric_info(folder).get("name"),
        "fp32_metric": fp32.get("metric"),
        "quantized_metric": int8.get("metric"),
        "int8_metric": int8.get("metric"),
        "calibrator": r("calibrate").get("method"),
        "left_in_float": r("calibrate").get("left_in_float", []),
        "skip_layers": partial.get("skip_layers", []),
        "partial_metric": partial.get("metric"),
        "qat_metric": qat.get("metric"),
        "final_metric": final,
        "scores": {k: r(k).get("scores") for k in ("fp32", "int8", "partial")
                   if r(k).get("scores")},
        "smoothquant": smooth.headline() if smooth is not None else None,
        "onnx": "model.onnx" if exp else None,
        "onnx_opset": exp.get("opset"),
        "onnx_bytes": exp.get("bytes"),
        "onnx_fp32_bytes": exp.get("fp32_bytes"),
        "compression": exp.get("compression"),
        "onnx_check": onnx_line,
        "lint": lint_line,
        "engine": engine_line,
        "sweep_warnings": r("sweep").get("warnings", []),
        "stages": {name: entry["status"] for name, entry in folder.state["stages"].items()},
    }


def _skip_line(skip: list[str], shown: int = 6) -> str:
    """``3: a, b, c``; a long list is cut after ``shown`` names (all in skip_layers.txt)."""
    if not skip:
        return "0"
    names = ", ".join(skip[:shown])
    more = f", ... ({len(skip) - shown} more in skip_layers.txt)" if len(skip) > shown else ""
    return f"{len(skip)}: {names}{more}"


def _summary_rows(s: dict[str, Any], folder: RunFolder,
                  choice: FormatChoice) -> list[tuple[str, str]]:
    skip = s["skip_layers"]
    digits, key = _digits(folder), _metric_info(folder).get("key")
    r = folder.result
    int8 = _fmt(_metric(folder, "int8"), digits) + _scores(r("int8"), key)
    how = "not calibrated" if choice.weight_only else s["calibrator"] or "-"
    final = (_fmt(s["final_metric"], digits)
             + _scores(r("qat") or r("partial") or r("int8"), key)
             if s["final_metric"] is not None else int8)
    rows = [
        ("format", choice.title),
        ("metric", s["metric"] or "none (no labels)"),
        ("FP32 metric", _fmt(_metric(folder, "fp32"), digits)),
        (f"{choice.short} metric (all layers)", f"{int8} ({how})"
         if s["int8_metric"] is not None else f"{int8}; calibrator {how}"),
        ("layers kept in float", _skip_line(skip)),
        (f"final {choice.short} metric", final),
        ("ONNX file", f"model.onnx, opset {s['onnx_opset']}, "
         + _onnx_size(folder.result("export")) if s["onnx"] else _status_line(folder, "export")),
        ("Q/DQ lint", s["lint"]),
        ("ONNX Runtime check", s["onnx_check"]),
        ("TensorRT engine", s["engine"]),
    ]
    if s["smoothquant"]:
        rows.insert(2, ("SmoothQuant", s["smoothquant"].removeprefix("SmoothQuant: ")))
    if s["sweep_warnings"]:
        rows.insert(rows.index(next(r for r in rows if r[0] == "layers kept in float")),
                    ("sensitivity sweep", "WARNING: " + "; ".join(s["sweep_warnings"])
                     + " (sensitivity/report.md)"))
    if s["failed_checks"]:
        rows.append(("result", "FAILED: " + "; ".join(s["failed_checks"])))
    return rows


def summary_table(folder: RunFolder, choice: FormatChoice | None = None) -> str:
    """The short table ``qdq run`` prints at the end."""
    choice = choice or FormatChoice()
    rows = _summary_rows(summary(folder, choice), folder, choice)
    width = max(len(k) for k, _ in rows)
    lines = [f"qdq run: {folder.root}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_report(folder: RunFolder, config: RunConfig, data: str,
                 choice: FormatChoice | None = None, device=None) -> None:
    """report.md, report.html and summary.json; ``device``: where the model ran."""
    choice = choice or FormatChoice()
    s = summary(folder, choice)
    made = provenance(device)
    folder.write_json("summary.json", {**s, "provenance": made})
    r = folder.result
    info = _metric_info(folder)
    metric_name, digits = s["metric"], _digits(folder)
    if metric_name is None:
        scoring = ("Evaluation: none, the data has no labels; the ONNX Runtime check "
                   "compares the exported file with PyTorch (top-1 agreement).")
    else:
        scoring = (f"Evaluation: {metric_name} (`{info.get('key', config.eval)}`). Target: "
                   f"at most {info.get('max_drop', config.max_drop)} below FP32.")
        if s["scores"]:
            scoring += (" The sweep and partial quantization use this number; the min and "
                        "mean cosine over the sentences are shown beside it.")
    parts = [f"# qdq run: `{config.model}`, {choice.title}", "", provenance_line(made), ""]
    if s["failed_checks"]:
        parts += ["**FAILED**: " + "; ".join(s["failed_checks"]) + ".", ""]
    parts += [f"Data: {data}. {scoring}", "",
              "## Summary", "", _md_table(["", ""],
                                          [list(row) for row in
                                           _summary_rows(s, folder, choice)]), ""]
    comparison = r("calibrate").get("comparison") or []
    if s["left_in_float"]:
        parts += ["## Left in float", "", "Never called during calibration, so not "
                  "quantized: " + ", ".join(f"`{n}`" for n in s["left_in_float"]) + ".", ""]
    if folder.status("calibrate") == "skipped":
        parts += ["## Calibration", "", _status_line(folder, "calibrate") + ".", ""]
    smooth = _smoothquant(folder)
    if smooth is not None:
        parts += ["## SmoothQuant", "", "Applied after inserting quantizers and before "
                  "calibrating (`smoothquant.txt`, `smoothquant.json`): per layer the alpha, "
                  "where `1/s` went, the quantized output error (relative MSE) and the "
                  "activation and weight ranges.", "", smooth.markdown()]
    if comparison:
        parts += ["## Calibrators", "",
                  _md_table(["method", metric_name or "metric", "seconds"],
                            [[c["method"], c["metric"], _fmt(c.get("seconds"))]
                             for c in comparison],
                            digits),
                  "", "![calibrators](calibrators.png)", ""]
    if folder.status("sweep") == "done":
        ranked = r("sweep").get("ranked", [])
        parts += ["## Sensitivity", ""]
        parts += [f"> **Warning:** {w}.\n" for w in s["sweep_warnings"]]
        parts += ["Most sensitive layers first; the full table is in "
                  "[sensitivity/report.md](sensitivity/report.md).", "",
                  _md_table(["layer", metric_name or "metric", "delta"],
                            [[x["layer"], x.get("metric"), x.get("delta")] for x in ranked],
                            digits),
                  "", "![sensitivity](sensitivity/sensitivity.png)", ""]
    else:
        parts += ["## Sensitivity", "", _status_line(folder, "sweep"), ""]
    partial = r("partial")
    if folder.status("partial") == "skipped":
        parts += ["## Partial quantization", "", _status_line(folder, "partial") + ".", ""]
    elif partial:
        parts += ["## Partial quantization", "",
                  f"{partial.get('why', '')}: {len(partial.get('skip_layers', []))} layers kept "
                  f"in float (`skip_layers.txt`), measured {metric_name or 'metric'} "
                  f"{_fmt(partial.get('metric'), digits)}{_scores(partial, info.get('key'))} "
                  "against a target "
                  f"of {_fmt(partial.get('target'), digits)}.", ""]
        if partial.get("history"):
            parts += ["Layers kept in float (most sensitive first) against the metric, "
                      "measured after each:", "",
                      _md_table(["layers in float", metric_name or "metric", "last returned"],
                                [[n, value, f"`{layer}`" if layer else "-"]
                                 for n, value, layer in partial["history"]], digits), ""]
    proxy = r("layers").get("proxy") or []
    if proxy:
        worst = [x for x in proxy if x["sqnr_db"] is not None][:10]
        parts += ["## Per-layer SQNR (one pass, no evaluation)", "",
                  _md_table(["layer", "SQNR dB", "output MSE"],
                            [[x["layer"], x["sqnr_db"], f"{x.get('mse') or 0:.3g}"]
                             for x in worst]),
                  "", "![layers](layers.png)", ""]
    if folder.status("qat") == "done":
        parts += ["## QAT", "", f"{r('qat')['epochs']} epochs: metric "
                  f"{_fmt(r('qat')['metric'])}.", ""]
    exp = r("export")
    if exp:
        parts += ["## Export", "",
                  f"`model.onnx` ({choice.title}): opset {exp.get('opset', config.opset)}, "
                  f"{exp['quantize_nodes']} QuantizeLinear / "
                  f"{exp['dequantize_nodes']} DequantizeLinear, {_onnx_size(exp)}, "
                  + f"{exp['folded_batchnorms']} BatchNorm folded into the layer before"
                  + (" when the weights were quantized." if choice.weight_only else ".")]
        rules = exp.get("rules")
        placed = ("none: weight-only layers need no Q/DQ placement" if choice.weight_only
                  else "off (`--no-rules`)" if rules is None else
                  ", ".join(f"{k} {v}" for k, v in rules.items()) or "nothing to change")
        parts += [f"Placement rules: {placed}.", ""]
    lint = r("lint")
    if lint:
        parts += ["## Q/DQ lint", "", s["lint"] + ".", ""]
        if lint.get("findings"):
            parts += [_md_table(["severity", "rule", "node", "message"],
                                [[f["severity"], f["rule"], f["node"], f["message"]]
                                 for f in lint["findings"]]), ""]
    parts += ["## ONNX Runtime", "", s["onnx_check"] + ".", "",
              "## TensorRT", "", s["engine"] + ".", ""]
    text = "\n".join(parts)
    folder.write_text("report.md", text)
    folder.write_text("report.html", _html(text, f"qdq run: {config.model}"))


def _html(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
             "img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{body}</body></html>\n")
