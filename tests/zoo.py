"""The model zoo every family is checked on: small inputs, random weights with BatchNorm
statistics from data, nothing downloaded. Each row runs the whole workflow: quantize
(``replace_modules``), the placement rules, calibrate, export, lint, verify against ONNX
Runtime, save/restore, and the list of layers left float.

``tests/test_zoo.py`` runs the light rows; ``scripts/zoo_table.py`` runs every row and
prints the table kept in BENCHMARKS.md.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import qdq
import sensitivity
from export import check_qdq, to_onnx, verify
from export.lint import ERROR
from qdq.rules import apply_rules


@dataclass(frozen=True)
class ZooRow:
    name: str
    family: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]  # calibration and verification inputs (a tensor or a dict)
    heavy: bool = False
    #: float layers that are expected to stay float here, by path prefix, with the reason
    explained: dict[str, str] = field(default_factory=dict)
    #: lint warnings expected here, by ONNX node name prefix, with the reason
    lint_explained: dict[str, str] = field(default_factory=dict)


def _image(n: int, size: int, seed: int = 1, frames: int | None = None) -> Callable[[], Any]:
    shape = (n, 3, size, size) if frames is None else (n, 3, frames, size, size)
    return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _tokens(vocab: int, n: int = 3, length: int = 8) -> Callable[[], Any]:
    def make():
        ids = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[-1, length // 2:] = 0  # one padded sentence
        return {"input_ids": ids, "attention_mask": mask}
    return make


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


def _detector_backbone() -> nn.Module:
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3).backbone


def _yolo() -> nn.Module:
    from tests.export.yolo_tiny import TinyYolo
    return TinyYolo()


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=5)


def _swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=5)


def _hf(kind: str, attn: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        if kind == "bert":
            config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=32)
            cls = transformers.BertModel
        elif kind == "llama":
            config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=64, vocab_size=50)
            cls = transformers.LlamaForCausalLM
        elif kind == "gpt2":
            config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50,
                                             bos_token_id=0, eos_token_id=0)
            cls = transformers.GPT2LMHeadModel
        else:
            raise ValueError(kind)
        config._attn_implementation = attn
        return cls(config)
    return build


ZOO: list[ZooRow] = [
    ZooRow("resnet18", "CNN classifier", _tv("resnet18", num_classes=10), _image(4, 64)),
    ZooRow("mobilenet_v3_small", "CNN, depthwise + SE", _tv("mobilenet_v3_small", num_classes=10),
           _image(4, 64)),
    ZooRow("r3d_18", "video CNN (Conv3DSimple)", _tv("r3d_18", num_classes=4),
           _image(2, 32, frames=4)),
    ZooRow("tiny-yolo", "detector (C2f, SPPF, FPN/PAN, 3 heads)", _yolo, _image(4, 64)),
    ZooRow("fasterrcnn-fpn-backbone", "detector backbone + FPN (dict outputs)",
           _detector_backbone, _image(2, 64)),
    ZooRow("vit", "torchvision ViT", _vit, _image(4, 32)),
    ZooRow("swin", "torchvision Swin", _swin, _image(4, 32)),
    ZooRow("bert-eager", "HF encoder, eager", _hf("bert", "eager"), _tokens(50)),
    ZooRow("bert-sdpa", "HF encoder, SDPA", _hf("bert", "sdpa"), _tokens(50)),
    ZooRow("llama-sdpa", "HF decoder (GQA), SDPA", _hf("llama", "sdpa"), _tokens(50),
           lint_explained={"/model/model/rotary_emb/": "rotary position angles (position ids "
                           "times frequencies; a MatMul in some transformers releases) are "
                           "position math, computed in float"}),
    ZooRow("gpt2-eager", "HF decoder, Conv1D", _hf("gpt2", "eager"), _tokens(50)),
    ZooRow("resnet152", "deep BatchNorm CNN", _tv("resnet152", num_classes=10), _image(2, 64),
           heavy=True),
    ZooRow("fcn_resnet50", "segmentation", _tv("fcn_resnet50", num_classes=3,
                                               weights_backbone=None, aux_loss=False),
           _image(2, 64), heavy=True),
    ZooRow("deeplabv3_mobilenet_v3_large", "segmentation",
           _tv("deeplabv3_mobilenet_v3_large", num_classes=3, weights_backbone=None,
               aux_loss=False), _image(2, 64), heavy=True),
    ZooRow("inception_v3", "CNN with concat + max-pool branches",
           _tv("inception_v3", num_classes=10, aux_logits=False, init_weights=False),
           _image(2, 96), heavy=True),
]


def _settle(model: nn.Module, batch: Any) -> None:
    """BatchNorm statistics from data (random weights leave them at 0/1)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or isinstance(batch, dict):
        return
    model.train()
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    with torch.no_grad():
        model(batch)
    model.eval()


def _call(model: nn.Module, batch: Any):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(batch, dict) and hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return out


def _first_row(batch: Any) -> Any:
    return {k: v[:1] for k, v in batch.items()} if isinstance(batch, dict) else batch[:1]


def _flat(out) -> list[torch.Tensor]:
    from export.onnx_export import flat_outputs
    return [t for _, t in flat_outputs(out)]


def run_row(row: ZooRow, folder: Path) -> dict[str, Any]:
    """The whole workflow on one row; returns what the table shows."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = row.build().eval()
    if isinstance(row.batch(), dict) and hasattr(model, "config"):
        model.config.use_cache = False
    batch = row.batch()
    _settle(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable parts are counted below
        qdq.replace_modules(model)
        model = apply_rules(model, _first_row(batch))
    report = model.qdq_rules_report
    sensitivity.calibrate(model, [batch], progress=False,
                          forward_fn=lambda m, b: _call(m, b))
    with torch.no_grad():
        before = _flat(_call(model, batch))
    onnx_path = folder / f"{row.name}.onnx"
    result = to_onnx(model, _first_row(batch), onnx_path)
    findings = check_qdq(onnx_path)
    checked = verify(model, onnx_path, batch)
    saved = qdq.save(model, folder / f"{row.name}.qdq.pt")
    torch.manual_seed(1)
    fresh = row.build()
    if isinstance(batch, dict) and hasattr(fresh, "config"):
        fresh.config.use_cache = False
    fresh = qdq.restore(fresh, saved).eval()
    with torch.no_grad():
        after = _flat(_call(fresh, batch))
    floats = qdq.float_layers(model)
    unexplained = [f for f in floats if not f.expected
                   and not any(f.name.startswith(p) for p in row.explained)]
    return {
        "row": row.name, "family": row.family,
        "quantizers": sum(1 for _ in qdq.quantizers(model)),
        "untraced": len(getattr(report, "untraced", []) or []),
        "q_nodes": result.quantize_nodes, "opset": result.opset,
        "lint_errors": sum(f.severity == ERROR for f in findings),
        "lint_warnings": sum(f.severity != ERROR for f in findings),
        "findings": [str(f) for f in findings],
        "unexplained_findings": [str(f) for f in findings if not any(
            f.node.startswith(p) for p in row.lint_explained)],
        "verify": checked.ok(1e-3), "verdict": checked.verdict(),
        "restore": len(before) == len(after) and all(
            torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "float_layers": len(floats), "unexplained_float": [str(f) for f in unexplained],
        "seconds": time.perf_counter() - start,
    }
