"""Trainer adapters: they decide *when* RELEX acts; :class:`~relex_callback.engine.RelexEngine` decides *what*.

* :mod:`relex_callback.trainers.transformers`: :class:`RelexCallback`, a transformers/TRL ``TrainerCallback``
  (imports transformers);
* :mod:`relex_callback.trainers.jump`: :class:`JumpController`, jump-mode scheduling (framework-free).
"""
