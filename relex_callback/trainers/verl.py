"""verl adapter: RELEX halt and jump mode inside a verl (0.9) PPO/GRPO run, without forking verl.

verl has no per-step callback, so the adapter extends verl where its own extensions do:

* :class:`RelexPPOTrainer`, registered as trainer mode ``"relex"`` (``trainer.v1.trainer_mode=relex``), is verl's
  synchronous trainer (it runs as mode ``"sync"``) that, after the policy update of every step and before the
  checkpoint and the weight push to the rollout engine, calls one method on the actor workers;
* :class:`RelexActorRolloutRefWorker` is verl's actor/rollout worker plus three driver-callable methods
  (``relex_begin``, ``relex_after_step``, ``relex_save``) that run a :class:`~relex_callback.trainers.steps.StepDriver`
  on each rank's own parameter shards (FSDP2 DTensors or FSDP1 with ``use_orig_params=True``): each rank keeps
  its shard of the delta history and only the T×T Grams are all-reduced.

A jump applied right after the update reaches the rollout engine (vLLM/SGLang) through verl's own
``update_weights`` at the end of the step, and the checkpoint of that step. The settings come from a top-level
``relex:`` block of the Hydra config with the fields of :class:`~relex_callback.config.RelexConfig`
(``docs/verl.md``). The ``verl.plugins`` entry point of the package imports this module, which registers the trainer.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from ..config import RelexConfig

__all__ = ["TRAINER_MODE", "relex_settings", "check_verl_setup", "RelexPPOTrainer", "RelexActorRolloutRefWorker"]

logger = logging.getLogger(__name__)

TRAINER_MODE = "relex"
STATE_DIR_NAME = "relex"  # global_step_N/relex/: each rank's saved window
MODEL_SUBDIR = "actor/huggingface"  # relex-step{K}/actor/huggingface: verl's layout, which `relex` reads back


def relex_settings(config: Any) -> RelexConfig:
    """The :class:`RelexConfig` of the top-level ``relex:`` block of a verl config, ``output_dir`` defaulting to
    ``trainer.default_local_dir``; an unknown key or a bad value raises ``ValueError`` naming ``relex.<key>``."""
    from omegaconf import OmegaConf

    block = config.get("relex") if hasattr(config, "get") else None
    if block is None:
        raise ValueError(
            "trainer.v1.trainer_mode=relex needs a top-level `relex:` block, e.g. on the command line "
            "`+relex.observe=20 +relex.extrapolate_to=auto`, or the overlay integrations/verl/relex_grpo.yaml."
        )
    values = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    if not values.get("output_dir"):
        values["output_dir"] = str(config.trainer.default_local_dir)
    try:
        return RelexConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid `relex:` block in the verl config: {error}") from error


def check_verl_setup(config: Any) -> RelexConfig:
    """Refuse, before any worker starts, the verl setups RELEX cannot run exactly in; return the settings."""
    settings = relex_settings(config)
    if not config.trainer.get("use_v1", True):
        raise ValueError("RELEX runs in verl's V1 trainer only: set trainer.use_v1=true (the legacy main_ppo_v0 has no hook).")
    actor = config.actor_rollout_ref.actor
    strategy = actor.get("strategy")
    if strategy not in ("fsdp", "fsdp2"):
        raise ValueError(
            f"actor_rollout_ref.actor.strategy={strategy!r} is not supported by RELEX: it needs each rank's own "
            "parameter shards (FSDP). Megatron, torchtitan and VeOmni split tensors in layouts RELEX cannot observe. "
            "Use actor_rollout_ref.actor.strategy=fsdp2."
        )
    fsdp = actor.get("fsdp_config", {}) or {}
    if strategy == "fsdp" and not fsdp.get("use_orig_params", False):
        raise ValueError(
            "actor_rollout_ref.actor.strategy=fsdp (FSDP1) keeps flat parameters unless use_orig_params is set; RELEX "
            "needs the original tensors. Set actor_rollout_ref.actor.fsdp_config.use_orig_params=true, or use "
            "actor_rollout_ref.actor.strategy=fsdp2."
        )
    world = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    fsdp_size = int(fsdp.get("fsdp_size", -1) or -1)
    if fsdp_size not in (-1, world):
        raise ValueError(
            f"actor_rollout_ref.actor.fsdp_config.fsdp_size={fsdp_size} gives hybrid sharding over {world} GPUs, which "
            "RELEX would count more than once. Set actor_rollout_ref.actor.fsdp_config.fsdp_size=-1."
        )
    if settings.mode == "jump":
        logger.warning(
            "RELEX: jump mode in verl runs without a probe (no rejected jumps); each jump is capped by the window's "
            "backtest (auto_horizon). Watch the validation score (trainer.test_freq) after the first jumps."
        )
    return settings


# ---------------------------------------------------------------------------------------------------------
# verl classes (this module is imported by verl's plugin loader, so verl is importable here)

try:
    from verl.single_controller.base.decorator import Dispatch, register
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1.trainer_base import register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.workers.engine_workers import ActorRolloutRefWorker
except Exception as error:  # verl's plugin loader would log this only at DEBUG level
    logger.warning("RELEX: its verl trainer (trainer mode %r) is unavailable: %s. It needs verl >= 0.9.1 with the V1 "
                   "trainer (pip install 'relex-callback[verl]').", TRAINER_MODE, error)
    raise


class RelexActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout worker with RELEX on the actor's local parameter shards (new methods only: verl's own
    registered methods are left as they are)."""

    relex_driver = None

    def _relex_engine(self):
        if self.actor is None:
            raise RuntimeError("RELEX needs the actor role: this worker has no actor model (role=%r)." % self.role)
        return self.actor.engine

    @contextmanager
    def _relex_on_device(self) -> Iterator[None]:
        """With ``param_offload`` the parameters sit on the CPU between updates: bring them back for RELEX."""
        engine = self._relex_engine()
        offloaded = bool(getattr(engine, "is_param_offload_enabled", False))
        if offloaded:
            from verl.utils.device import get_device_name

            engine.to(get_device_name(), model=True, optimizer=False, grad=False)
        try:
            yield
        finally:
            if offloaded:
                engine.to("cpu", model=True, optimizer=False, grad=False)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def relex_begin(self, settings: dict, step: int, resume_dir: str | None = None) -> dict:
        """Attach RELEX to the actor at trainer step ``step`` (θ_0 now, or the saved window from ``resume_dir``)."""
        from .steps import StepDriver

        engine = self._relex_engine()
        self.relex_driver = StepDriver(RelexConfig.from_dict(settings), model_subdir=MODEL_SUBDIR)
        tokenizer = getattr(getattr(engine, "model_config", None), "tokenizer", None)
        with self._relex_on_device():
            self.relex_driver.begin(engine.module, step, settings["output_dir"], optimizer=engine.optimizer,
                                    processing_class=tokenizer, resume_dir=resume_dir)
        return {"tracked": len(self.relex_driver.engine.tracked), "buffer_bytes": self.relex_driver.engine.buffer.nbytes}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def relex_after_step(self, step: int) -> dict:
        """Record, halt or jump after the policy update of ``step``; returns the outcome as plain data."""
        with self._relex_on_device():
            outcome = self.relex_driver.after_step(step)
        return {"metrics": outcome.metrics, "halted": outcome.halted, "written": outcome.written, "jump": outcome.jump}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def relex_save(self, directory: str) -> str | None:
        """Save this rank's window into ``directory`` (``global_step_N/relex``)."""
        path = self.relex_driver.save(directory) if self.relex_driver is not None else None
        return None if path is None else str(path)


@register_trainer(TRAINER_MODE)
class RelexPPOTrainer(PPOTrainerSync):
    """verl's synchronous PPO trainer with RELEX after every policy update (see the module docstring)."""

    def __init__(self, config: Any) -> None:
        from omegaconf import open_dict

        self.relex_config = check_verl_setup(config)
        with open_dict(config):  # the base trainer tests trainer_mode == "sync" in several places
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)
        self.relex_halted = False

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        import ray

        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(RelexActorRolloutRefWorker)

    def _relex_state_dir(self, step: int) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{step}", STATE_DIR_NAME)

    def on_init_end(self) -> None:
        step = int(self.global_steps)  # the checkpoint's step after a resume, else 0
        resume = self._relex_state_dir(step) if step > 0 else None
        info = self.actor_rollout_wg.relex_begin(self.relex_config.to_dict(), step, resume)
        logger.info("RELEX: attached to the actor at step %d (%s tensors on rank 0)", step, info[0]["tracked"])
        super().on_init_end()

    def step(self, metrics: dict, timing_raw: dict):
        batch = super().step(metrics, timing_raw)
        from verl.utils.debug import marked_timer

        with marked_timer("relex", timing_raw, color="purple"):
            outcome = self.actor_rollout_wg.relex_after_step(int(self.global_steps))[0]
        metrics.update(outcome["metrics"])
        if outcome["halted"] and not self.relex_halted:
            self.relex_halted = True
            self.total_training_steps = self.global_steps  # fit() ends after this step's checkpoint and logging
            logger.warning("RELEX: halt mode wrote %s; the run stops after step %d", outcome["written"], self.global_steps)
        return batch

    def _save_checkpoint(self) -> None:
        # before verl writes latest_checkpointed_iteration.txt, so a checkpoint it points to has the window
        self.actor_rollout_wg.relex_save(self._relex_state_dir(int(self.global_steps)))
        super()._save_checkpoint()

