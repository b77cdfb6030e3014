"""Example inputs with lists, tuples and dicts: recorded by apply_rules, replayed by
qdq.restore with the same structure."""

from __future__ import annotations

import torch
from torch import nn

import qdq
from qdq.checkpoint import read
from qdq.nn import QuantConcat
from qdq.rules import apply_rules
from qdq.rules.spec import example_of, input_spec


class ListAndDict(nn.Module):
    """Takes a list of two images and a dict holding a third."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, images, extra):
        y = torch.cat([self.a(images[0]), self.b(images[1]), self.c(extra["depth"])], 1)
        return self.head(y)


def _calibrate(model: nn.Module, example: tuple) -> None:
    quantizers = [q for _, q in qdq.quantizers(model) if q.is_enabled]
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(*example)
    for q in quantizers:
        q.load_calib_amax(strict=False)
        q.enable_quant()
        q.disable_calib()


def _inputs(rng) -> tuple:
    return ([torch.randn(2, 3, 6, 6, generator=rng), torch.randn(2, 3, 6, 6, generator=rng)],
            {"depth": torch.randn(2, 1, 6, 6, generator=rng)})


def test_list_and_dict_arguments_restore(rng, tmp_path):
    torch.manual_seed(0)
    model = ListAndDict().eval()
    example = _inputs(rng)
    model = apply_rules(model, example)
    assert sum(isinstance(m, QuantConcat) for m in model.modules()) == 1
    _calibrate(model, example)
    with torch.no_grad():
        before = model(*example)
    path = qdq.save(model, tmp_path / "m.pt")
    entry = read(path)["recipe"]["rules"][0]
    assert entry["inputs"][0] == {"list": [{"shape": [2, 3, 6, 6], "dtype": "float32"}] * 2}
    assert entry["inputs"][1] == {"dict": {"depth": {"shape": [2, 1, 6, 6],
                                                     "dtype": "float32"}}}
    restored = qdq.restore(ListAndDict().eval(), path)
    with torch.no_grad():
        assert torch.equal(restored(*example), before)


def test_spec_round_trip():
    value = ([torch.ones(2, 3), None], (torch.zeros(1, dtype=torch.long), 3, "mean"),
             {"mask": torch.ones(4, dtype=torch.bool), "scale": 0.5, "on": True})
    spec = input_spec(value)
    back = example_of(spec)
    assert isinstance(back[0], list) and back[0][1] is None
    assert back[0][0].shape == (2, 3) and back[0][0].dtype == torch.float32
    assert isinstance(back[1], tuple) and back[1][1:] == (3, "mean")
    assert back[1][0].dtype == torch.long
    assert back[2]["mask"].dtype == torch.bool and back[2]["scale"] == 0.5
    assert back[2]["on"] is True
    assert input_spec(object()) is None and example_of(None) is None
    legacy = {"shape": [1, 2], "dtype": "float16"}  # files written before nesting was kept
    assert example_of(legacy).dtype == torch.float16
