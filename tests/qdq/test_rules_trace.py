"""Tracing keeps working on every supported torch.

No ``from __future__ import annotations`` here: the forward below needs real PEP 604
union objects in its signature, as Hugging Face modules have.
"""

import typing

import torch
from torch import nn

import qdq
from qdq.rules import apply_rules
from qdq.rules.trace import trace_parts


class UnionArguments(nn.Module):
    """Two arguments annotated with equal ``X | None`` unions (Hugging Face BERT's
    embeddings have four): torch 2.4's fx asserted while writing their code."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                n: int | None = None) -> torch.Tensor:
        return self.conv(x) + y


def test_pep604_annotations_trace_and_keep_their_meaning(rng):
    (part,) = trace_parts(UnionArguments().eval())
    assert part.error is None and part.graph_module is not None
    types = {n.target: n.type for n in part.graph_module.graph.nodes if n.op == "placeholder"}
    assert {k: set(typing.get_args(t)) for k, t in types.items()} == {
        "x": {torch.Tensor, type(None)}, "y": {torch.Tensor, type(None)}, "n": {int, type(None)}}
    model = UnionArguments().eval()
    x, y = torch.randn(2, 3, 4, 4, generator=rng), torch.randn(2, 3, 4, 4, generator=rng)
    with torch.no_grad():
        reference = model(x, y)
        ruled = apply_rules(model, (x, y))
        assert ruled.qdq_rules_report.untraced == []
        assert ruled.qdq_rules_report.changes["residual_add"] == 1
        with qdq.disable_quantization(ruled):
            torch.testing.assert_close(ruled(x, y), reference)
