"""Trainer adapters: they decide *when* RELEX acts; :class:`~relex_callback.engine.RelexEngine` decides *what*.

* :mod:`relex_callback.trainers.transformers`: :class:`RelexCallback`, a transformers/TRL ``TrainerCallback``
  (imports transformers);
* :mod:`relex_callback.trainers.jump`: :class:`JumpController`, jump-mode scheduling (framework-free);
* :mod:`relex_callback.trainers.steps`: :class:`StepDriver`, RELEX advanced by step numbers (framework-free), for
  trainers without a callback API;
* :mod:`relex_callback.trainers.verl`: the verl adapter (imports verl; loaded by verl's plugin entry point).
"""
