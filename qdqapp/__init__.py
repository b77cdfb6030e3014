"""qdqapp: the application on top of the three libraries.

It holds what a user runs rather than imports: the ``qdq`` command (:mod:`qdqapp.cli`),
the ``qdq run`` pipeline (:mod:`qdqapp.pipeline`), and what every command shares:

- :mod:`qdqapp.specs`: every command's flags parsed once, at the edge, into frozen specs
  (model, format, data, eval; outputs in :mod:`qdqapp.outputs`) that the flow trusts;
- :mod:`qdqapp.models`: model specs (a registry of kinds: ``reference``,
  ``torchvision:NAME``, ``package.module:factory``) and ``--checkpoint`` files;
- :mod:`qdqapp.sources`: data specs (a registry of kinds: ``fashion-mnist``,
  ``imagefolder:DIR``, ``random:SHAPE``), one loader and one image preprocessing;
- :mod:`qdqapp.flow`: the one model-preparation flow (build, checkpoint or
  ``qdq.restore``, ``--ignore``, placement rules, calibration);
- :mod:`qdqapp.calibrators`: calibrators by name; :mod:`qdqapp.evaluate`: metrics;
- :mod:`qdqapp.outputs`: output paths checked up front, folders owned by the command that
  made them, and cleaned after a failure; :mod:`qdqapp.logs`: what the console shows;
- :mod:`qdqapp.data` and :mod:`qdqapp.reference`: Fashion-MNIST and the reference model
  with its trained checkpoint.

It imports ``qdq``, ``sensitivity`` and ``export``; none of them imports it.
"""
