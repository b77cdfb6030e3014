"""qdqapp: the application on top of the three libraries.

It holds what a user runs rather than imports: the ``qdq`` command (:mod:`qdqapp.cli`),
the ``qdq run`` pipeline (:mod:`qdqapp.pipeline`), data specs and loaders
(:mod:`qdqapp.sources`, :mod:`qdqapp.data`), evaluation metrics (:mod:`qdqapp.evaluate`)
and the Fashion-MNIST reference model with its trained checkpoint
(:mod:`qdqapp.reference`). It imports ``qdq``, ``sensitivity`` and ``export``; none of them
imports it.
"""
