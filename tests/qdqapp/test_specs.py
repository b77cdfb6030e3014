"""The specs every command parses its flags into: frozen, checked once, trusted after."""

from __future__ import annotations

import dataclasses

import pytest

from qdqapp.errors import CliError, Names
from qdqapp.flow import Session
from qdqapp.specs import parse_data, parse_eval, parse_model

TINY = "tests.qdqapp.models:tiny_cnn"


def test_the_specs_build_the_model_and_cannot_be_changed():
    model = parse_model(TINY, format="fp8", seed=3)
    data = parse_data("random:2x3x16x16", model=model, calib_batches=2)
    evaluation = parse_eval("top1", model=model, data=data)
    assert (model.format.name, model.seed, data.seed, data.calib_batches) == ("fp8", 3, 3, 2)
    assert evaluation.name == "top1" and evaluation.function is None
    for spec, field in ((model, "seed"), (data, "batch_size"), (evaluation, "name")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, field, None)
    session = Session.open(model, data, progress=False)
    assert session.choice.name == "fp8" and session.source.calib()[0].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("call, message", [
    (lambda: parse_model(TINY, seed=True), "--seed: expected a non-negative integer"),
    (lambda: parse_model(TINY, smoothquant_alpha=2), "--smoothquant-alpha 2: expected"),
    (lambda: parse_data("random:2x3", model=parse_model(TINY), batch_size=0),
     "--batch-size: expected a positive integer, got 0"),
    (lambda: parse_data(None, model=parse_model(TINY, smoothquant=True)),
     "--smoothquant needs --data"),
    (lambda: parse_eval("nope", model=parse_model(TINY), data=None),
     "--eval 'nope': choose one of auto, top1"),
    (lambda: parse_eval("no_such_module:fn", model=parse_model(TINY), data=None, custom=True),
     "--eval 'no_such_module:fn': cannot load it"),
    (lambda: parse_model(TINY, format="w4", block_size=0, names=Names("run.yaml",
                                                                       ["block_size"])),
     "block_size (run.yaml) 0: expected a positive integer"),
])
def test_a_bad_value_is_one_error_naming_its_flag(call, message):
    with pytest.raises(CliError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
