"""A verl actor worker for CPU tests: :class:`RelexActorRolloutRefWorker` (RELEX's subclass of verl's real
``ActorRolloutRefWorker``) whose actor is a tiny config-built Qwen2 sharded with FSDP2 over gloo.

verl registers its own FSDP engines for CUDA/NPU only, so ``init_model`` cannot build the actor on a CPU
machine; :meth:`TinyActorWorker.build_tiny_actor` puts in its place what RELEX reads from verl's engine
(``actor.engine.module``, ``.optimizer``, ``.model_config.tokenizer``). Everything else is verl's: the Ray worker
group, the ``@register`` dispatch and the worker class RELEX ships.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from verl.single_controller.base.decorator import Dispatch, register

from relex_callback.trainers.verl import RelexActorRolloutRefWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import tiny_qwen2, tiny_tokenizer  # noqa: E402


class TinyActorWorker(RelexActorRolloutRefWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def build_tiny_actor(self, lr: float, minibatches: int) -> int:
        """FSDP2 over all ranks (gloo; verl's Worker set RANK/WORLD_SIZE/MASTER_*), AdamW; returns the world size."""
        from torch.distributed.fsdp import fully_shard

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        torch.set_num_threads(1)
        tokenizer = tiny_tokenizer()
        model = tiny_qwen2(tokenizer=tokenizer)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.actor = SimpleNamespace(engine=SimpleNamespace(
            module=model, optimizer=optimizer, model_config=SimpleNamespace(tokenizer=tokenizer),
            is_param_offload_enabled=False))
        self.minibatches = minibatches
        return dist.get_world_size()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def update(self, step: int) -> None:
        """One verl step of the actor: ``minibatches`` optimizer steps on this rank's data (a drift plus noise)."""
        engine = self.actor.engine
        generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        for _ in range(self.minibatches):
            ids = torch.randint(3, 60, (4, 12), generator=generator)
            engine.module.train()
            engine.module(input_ids=ids, labels=ids).loss.backward()
            engine.optimizer.step()
            engine.optimizer.zero_grad()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 tensors (gathered from the shards) on rank 0, ``None`` elsewhere."""
        full = {name: p.full_tensor().detach().float().clone() for name, p in self.actor.engine.module.named_parameters()}
        return full if dist.get_rank() == 0 else None
