"""Draw a residual block before and after ``qdq.rules.apply_rules`` (docs/rules_before_after.png).

The graphs are read from the real models (torch.fx), not drawn by hand: left, every
Conv got its quant twin (module-level insertion) and BatchNorm is still there; right,
after the rules BatchNorm is folded and the identity input of the Add is quantized with
the same quantizer as conv1's input, so TensorRT can fuse the Add into conv2.

    PYTHONPATH=. python scripts/render_rules_picture.py [--out docs/rules_before_after.png]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from torch import fx, nn  # noqa: E402

import qdq  # noqa: E402
from qdq.fileio import atomic_write  # noqa: E402
from qdq.nn import QuantAdd  # noqa: E402
from qdq.nn.mixin import QuantInputMixin, QuantMixin  # noqa: E402
from qdq.rules import apply_rules  # noqa: E402
from qdq.rules.trace import QdqTracer  # noqa: E402

COLORS = {"qdq": "#f4a259", "layer": "#8fb8de", "bn": "#c9c9c9", "add": "#9bd39b",
          "act": "#f1e3a1", "io": "#ffffff"}


class Block(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + x)


@dataclass
class Drawing:
    labels: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, label: str, kind: str, *inputs: str) -> str:
        self.labels[key], self.kinds[key] = label, kind
        self.edges += [(i, key) for i in inputs]
        return key


def _qdq(d: Drawing, q, source: str, seen: dict) -> str:
    """One Q/DQ box per (quantizer, tensor): a shared quantizer on one tensor is one box."""
    key = (id(q), source)
    if key not in seen:
        rule = f"\n[{q.placed_by}]" if q.placed_by and q.placed_by != "module" else ""
        seen[key] = d.add(f"qdq{len(seen)}", f"Q/DQ{rule}", "qdq", source)
    return seen[key]


def describe(gm: fx.GraphModule) -> Drawing:
    d, seen, value = Drawing(), {}, {}
    for node in gm.graph.nodes:
        args = [value[a.name] for a in node.args if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            value[node.name] = d.add(node.name, "input", "io")
        elif node.op == "output":
            d.add("output", "output", "io", *args)
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.Identity):
                value[node.name] = args[0]  # a folded BatchNorm
                continue
            ins = args
            if isinstance(m, QuantAdd):
                qs = (m._input_quantizer, m._other_quantizer)
                ins = [_qdq(d, q, a, seen) if q.is_enabled else a
                       for q, a in zip(qs, args, strict=True)]
                value[node.name] = d.add(node.name, "Add", "add", *ins)
                continue
            if isinstance(m, QuantInputMixin) and m._input_quantizer.is_enabled:
                ins = [_qdq(d, m._input_quantizer, args[0], seen)]
            name = type(m).__name__.replace("Quant", "")
            if isinstance(m, QuantMixin):
                name += "\n(weight Q/DQ)"
            kind = "bn" if "BatchNorm" in name else "act" if name == "ReLU" else "layer"
            value[node.name] = d.add(node.name, name, kind, *ins)
        else:
            label = "Add" if "add" in str(node.target) else str(node.target)
            value[node.name] = d.add(node.name, label, "add", *args)
    return d


def _layout(d: Drawing) -> dict[str, tuple[float, float]]:
    depth: dict[str, int] = {}
    for key in d.labels:  # labels are in topological order
        parents = [a for a, b in d.edges if b == key]
        depth[key] = 1 + max((depth[p] for p in parents), default=-1)
    rows: dict[int, list[str]] = {}
    for key, level in depth.items():
        rows.setdefault(level, []).append(key)
    pos = {}
    for level, keys in rows.items():
        for i, key in enumerate(keys):
            pos[key] = (1.6 * (i - (len(keys) - 1) / 2), -level)
    return pos


def draw(ax, d: Drawing, title: str) -> None:
    pos = _layout(d)
    for a, b in d.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        skip = ya - yb > 1.5
        ax.annotate("", xy=(xb, yb + 0.28), xytext=(xa, ya - 0.28),
                    arrowprops={"arrowstyle": "-|>", "color": "#444", "lw": 1.2,
                                "connectionstyle": f"arc3,rad={-0.55 if skip else 0}"})
    for key, (x, y) in pos.items():
        ax.add_patch(FancyBboxPatch((x - 0.62, y - 0.26), 1.24, 0.52,
                                    boxstyle="round,pad=0.02", fc=COLORS[d.kinds[key]],
                                    ec="#333", lw=1))
        ax.text(x, y, d.labels[key], ha="center", va="center", fontsize=7.5)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.6, max(xs) + 1.6)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/rules_before_after.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16, 16)

    before = Block().eval()
    qdq.replace_modules(before)
    before_gm = fx.GraphModule(before, QdqTracer().trace(before))
    after = apply_rules(Block().eval(), x)

    fig, axes = plt.subplots(1, 2, figsize=(10, 9))
    draw(axes[0], describe(before_gm), "before: quant twins only\n"
         "BN unfolded, identity input float:\nTensorRT cannot fuse the Add")
    draw(axes[1], describe(after), "after qdq.rules.apply_rules\n"
         "BN folded; identity quantized by conv1's quantizer;\n"
         "conv2 output stays float, so Add fuses into conv2")
    axes[1].text(0.5, 0.0, "[same_tensor]: one quantizer object, read by conv1 and by\n"
                 "the Add's identity input (the residual_add rule put it there)",
                 transform=axes[1].transAxes, ha="center", va="top", fontsize=8)
    fig.tight_layout()
    out = os.path.abspath(args.out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    print(out)


if __name__ == "__main__":
    main()
