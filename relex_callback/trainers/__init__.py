"""Trainer adapters: they translate a trainer's events into calls on :class:`~relex_callback.engine.window.Window`,
which decides *what* RELEX does.

* :mod:`relex_callback.trainers.transformers`: :class:`RelexCallback`, a transformers/TRL ``TrainerCallback``
  (imports transformers);
* :mod:`relex_callback.trainers.steps`: :class:`StepDriver`, RELEX advanced by step numbers (framework-free), for
  trainers without a callback API;
* :mod:`relex_callback.trainers.verl`: the verl adapter (imports verl; loaded by verl's plugin entry point).
"""
