"""Everything that touches ``torch.distributed`` lives here; on one process every function is a no-op.

The RELEX fit is shard-local: each process keeps the delta history of its own flat slice of every
tensor, the per-tensor Gram matrices are summed with one all-reduce, and each process combines its
own slice of the prediction. Full parameters are never gathered for the fit; they are gathered only
to write the result (a full checkpoint on rank 0, or replicated weights on every rank).

How each parameter layout is tracked (:func:`track_parameters`):

* one process: the whole parameter (:class:`~relex_callback.buffer.TrackedTensor`);
* DDP and other replicated parameters: a "virtual shard" :class:`ReplicatedSlice`, the range
  :func:`partition_range` of the flattened parameter, so the buffer per process is ≈ total / world;
  writes all-gather the slices and every process ends with identical weights;
* FSDP2 (``fully_shard``, DTensor ``Shard(0)`` on a 1-D mesh over all processes) and FSDP1 with
  ``use_orig_params=True`` (FULL_SHARD / SHARD_GRAD_OP): the process's own shard (:class:`LocalShard`),
  edited in place;
* DeepSpeed ZeRO-3: the local fp32 master partition (:class:`Zero3Partition`), read with
  ``safe_get_local_fp32_param`` and written with ``safe_set_local_fp32_param`` plus the 16-bit ``ds_tensor``;
* DeepSpeed ZeRO-1/2 (and its bf16 optimizer): the fp32 master fragment this process owns
  (:class:`ZeroFragment`, ``param._hp_mapping``); writes also all-gather the slices into every
  process's full 16-bit parameter.

Anything else that shards or replicates parameters in a way these cannot describe (FSDP1 without
``use_orig_params``, hybrid/NO_SHARD FSDP1, tensor-parallel or multi-dimensional DTensors, Megatron-LM,
XLA) raises :class:`UnsupportedSetupError` when training begins.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .buffer import TrackedTensor

__all__ = [
    "UnsupportedSetupError",
    "ReplicatedSlice",
    "LocalShard",
    "ZeroFragment",
    "Zero3Partition",
    "world_info",
    "is_main_process",
    "all_reduce_sum",
    "all_reduce_max",
    "all_reduce_grams",
    "mean_over_processes",
    "shards_parameters",
    "check_can_generate",
    "partition_range",
    "detect_layout",
    "track_parameters",
    "write_prediction",
    "gather_state_dict",
    "unwrap_model",
    "saving_gathered",
    "clean_name",
    "communication_bytes",
    "communication_report",
    "reset_communication_bytes",
]

logger = logging.getLogger(__name__)

GATHER_BUCKET_ELEMENTS = 1 << 26
"""Largest number of elements one process contributes to a single all-gather of prediction slices."""

_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


class UnsupportedSetupError(RuntimeError):
    """The model's parallel layout is one RELEX cannot observe exactly (raised at train begin)."""


# -- process group ----------------------------------------------------------------------------------------


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if not _active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    return world_info()[0] == 0


def _reduce_device() -> torch.device:
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- communication accounting -----------------------------------------------------------------------------

_COMMUNICATED: dict[str, int] = defaultdict(int)
_LAST_FIT_BYTES = 0


def _count(category: str, tensor: torch.Tensor) -> None:
    """Record the payload one process contributes to a collective (its input tensor's bytes)."""
    _COMMUNICATED[category] += tensor.numel() * tensor.element_size()


def communication_bytes() -> dict[str, int]:
    """Bytes this process has contributed to collectives since the last reset, by category.

    ``gram_all_reduce``: the packed Gram matrices of the fits; ``scalar_all_reduce``: flags and totals;
    ``prediction_all_gather`` / ``state_dict_gather``: prediction slices gathered to write weights.
    """
    return dict(_COMMUNICATED)


def communication_report() -> dict[str, Any]:
    """``communication_bytes`` plus the bytes of the last fit's Gram all-reduce (what the report shows)."""
    return {"last_fit_bytes": _LAST_FIT_BYTES, "cumulative": communication_bytes()}


def reset_communication_bytes() -> None:
    global _LAST_FIT_BYTES
    _COMMUNICATED.clear()
    _LAST_FIT_BYTES = 0


# -- collectives ------------------------------------------------------------------------------------------


def all_reduce_sum(tensor: torch.Tensor, category: str = "scalar_all_reduce") -> torch.Tensor:
    """Sum ``tensor`` over all processes (returns a new tensor on the tensor's device)."""
    if not _active():
        return tensor
    work = tensor.to(_reduce_device()).clone()
    _count(category, work)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over all processes."""
    if not _active():
        return int(value)
    work = torch.tensor([int(value)], dtype=torch.int64, device=_reduce_device())
    _count("scalar_all_reduce", work)
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return int(work.item())


def mean_over_processes(compute: Callable[[], float], what: str) -> float:
    """The mean of ``compute()`` over all processes; collective, so every process takes the same decision.

    When ``compute`` raises on any process, every process raises: the failing one its own error, the others a
    ``RuntimeError`` naming ``what`` (no process is left waiting in a collective the failing one never joins).
    """
    try:
        value, error = float(compute()), None
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes learned of it
        value, error = 0.0, err
    if not _active():
        if error is not None:
            raise error
        return value
    total, failed = all_reduce_sum(torch.tensor([value, float(error is not None)], dtype=torch.float64)).tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"RELEX: {what} raised on {int(failed)} other process(es); this process stops with it (that process "
            "logged the error)."
        )
    return total / dist.get_world_size()


def all_reduce_grams(grams: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum many small symmetric Gram matrices over processes with a single collective.

    Only the upper triangles travel: T(T+1)/2 fp64 values per tensor.
    """
    global _LAST_FIT_BYTES
    if not _active() or not grams:
        return grams
    packed = []
    for gram in grams:
        rows, cols = torch.triu_indices(gram.shape[0], gram.shape[1])
        packed.append(gram.detach().to("cpu", torch.float64)[rows, cols])
    flat = torch.cat(packed)
    before = _COMMUNICATED["gram_all_reduce"]
    flat = all_reduce_sum(flat, category="gram_all_reduce")
    _LAST_FIT_BYTES = _COMMUNICATED["gram_all_reduce"] - before
    out, offset = [], 0
    for gram in grams:
        size = gram.shape[0]
        rows, cols = torch.triu_indices(size, size)
        full = torch.zeros(size, size, dtype=torch.float64)
        count = rows.numel()
        full[rows, cols] = flat[offset : offset + count]
        full[cols, rows] = flat[offset : offset + count]
        out.append(full.to(gram.device))
        offset += count
    return out


def partition_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The flat range ``[start, stop)`` of a ``numel``-element tensor owned by ``rank`` (contiguous, balanced)."""
    base, extra = divmod(numel, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shards_parameters(model: torch.nn.Module) -> bool:
    """True when ``model``'s parameters are split between processes (FSDP1/FSDP2, ZeRO-3): then every forward pass,
    ``generate`` included, is a collective that every process must run the same number of times."""
    if not _active():
        return False
    params = list(model.parameters())
    return bool(_fsdp1_modules(model)) or any(hasattr(p, "ds_id") or _is_dtensor(p) for p in params)


def check_can_generate(model: torch.nn.Module) -> None:
    """Refuse ``generate`` on an FSDP1 model on several processes: it runs the wrapped module without the root FSDP
    unit's gather, so the root's own parameters stay flat shards (an error deep in the model, "'weight' must be
    2-D").

    Raises:
        UnsupportedSetupError: with what to use instead.
    """
    if _active() and _fsdp1_modules(model):
        raise UnsupportedSetupError(
            "RewardProbe cannot generate on an FSDP1 (FullyShardedDataParallel) model: generate() bypasses the root "
            "FSDP unit, whose parameters stay sharded. Use FSDP2 (fully_shard; accelerate fsdp_version: 2), DDP or "
            "DeepSpeed ZeRO, or a probe of your own that gathers the weights (FSDP.summon_full_params)."
        )


# -- tracked-tensor kinds ---------------------------------------------------------------------------------


@dataclass
class ReplicatedSlice(TrackedTensor):
    """A virtual shard: every process holds the full parameter and tracks ``[start, stop)`` of it (DDP)."""

    @property
    def offset(self) -> int:
        """Where the slice starts in the flattened full parameter."""
        return int(self.start)

    def full_flat(self) -> torch.Tensor:
        """The process's full 16/32-bit parameter, flat (the target of gathered writes)."""
        return self.param.data.reshape(-1)


@dataclass
class LocalShard(TrackedTensor):
    """The whole local shard of a sharded parameter (FSDP2 DTensor, FSDP1 ``use_orig_params`` view).

    ``fsdp_modules``: the model's FSDP2 modules. After a forward pass outside training (a probe's ``generate``)
    FSDP2 keeps the root module's parameters gathered, and the next forward uses that copy; they are resharded before
    a shard is written, so the next forward gathers the written shards.
    """

    full_shape: tuple[int, ...] | None = None
    fsdp_modules: tuple[Any, ...] = ()


@dataclass
class ZeroFragment(ReplicatedSlice):
    """The fp32 master fragment a process owns under DeepSpeed ZeRO-1/2 (``param._hp_mapping``).

    Reads and in-place writes go to the fp32 master copy; the 16-bit parameter is full on every process
    and receives every process's fragment through an all-gather.
    """

    def local_data(self) -> torch.Tensor:
        mapping = getattr(self.param, "_hp_mapping", None)
        if mapping is None:
            return torch.empty(0, dtype=torch.float32, device=self.param.device)
        return mapping.get_hp_fragment().reshape(-1)

    @property
    def offset(self) -> int:
        mapping = getattr(self.param, "_hp_mapping", None)
        return int(mapping.lp_fragment_address.start) if mapping is not None else 0


@dataclass
class Zero3Partition(TrackedTensor):
    """The local fp32 master partition of a ZeRO-3 parameter (without its padding)."""

    full_shape: tuple[int, ...] | None = None

    def local_data(self) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(self.param).reshape(-1)


# -- layout detection --------------------------------------------------------------------------------------


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return isinstance(tensor, DTensor) or isinstance(getattr(tensor, "data", None), DTensor)


def _accelerate_distributed_type() -> str | None:
    """accelerate's ``DistributedType`` name when an ``Accelerator`` was set up (``None`` otherwise)."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return None
    value = AcceleratorState._shared_state.get("distributed_type")
    return None if value is None else str(getattr(value, "value", value)).upper()


def _fsdp1_modules(model: torch.nn.Module) -> list[Any]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def detect_layout(model: torch.nn.Module) -> str:
    """``"single"``, ``"ddp"``, ``"fsdp2"``, ``"fsdp1"``, ``"deepspeed-zero3"`` or ``"deepspeed-zero12"``.

    Raises:
        UnsupportedSetupError: for a layout RELEX cannot track exactly, with what to use instead.
    """
    kind = _accelerate_distributed_type()
    if kind is not None and ("MEGATRON" in kind or kind == "XLA" or "TPU" in kind):
        raise UnsupportedSetupError(
            f"RELEX does not support accelerate's {kind} backend: its parameters are sharded in ways the callback "
            "cannot observe. Use DDP, FSDP2 (fully_shard), FSDP1 with use_orig_params=True, or DeepSpeed ZeRO-1/2/3."
        )
    params = list(model.parameters())
    if any(p.device.type == "xla" for p in params):
        raise UnsupportedSetupError(
            "RELEX does not support XLA devices (TPU): use CUDA or CPU with DDP, FSDP2, FSDP1(use_orig_params=True) "
            "or DeepSpeed."
        )
    if any(hasattr(p, "ds_id") for p in params):
        return "deepspeed-zero3"
    if any(hasattr(p, "_hp_mapping") for p in params):
        return "deepspeed-zero12"
    if kind == "DEEPSPEED":
        raise UnsupportedSetupError(
            "DeepSpeed is active but the model's parameters carry no ZeRO partition metadata (ds_id / _hp_mapping): "
            "RELEX must be used through a Trainer whose DeepSpeed engine and optimizer were created before training "
            "begins (ZeRO stage 1, 2 or 3 with a DeepSpeed-managed optimizer)."
        )
    fsdp1 = _fsdp1_modules(model)
    if fsdp1:
        _check_fsdp1(fsdp1)
        return "fsdp1"
    dtensors = [(n, p) for n, p in model.named_parameters() if _is_dtensor(p)]
    if dtensors:
        for name, param in dtensors:
            _check_dtensor(name, param)
        return "fsdp2"
    return "ddp" if world_info()[1] > 1 else "single"


def _check_dtensor(name: str, param: torch.Tensor) -> None:
    from torch.distributed.tensor import Shard

    _, world = world_info()
    mesh = param.device_mesh
    placements = tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),) or mesh.size() != world:
        raise UnsupportedSetupError(
            f"RELEX supports DTensor parameters only as FSDP2 shards: placement (Shard(0),) on a 1-D mesh over all "
            f"{world} processes. {name!r} has placements {placements} on a mesh of shape {tuple(mesh.shape)} "
            "(tensor parallelism or HSDP). Use plain FSDP2 (fully_shard over the whole world), DDP or DeepSpeed, or "
            "exclude these parameters with RelexCallback(exclude=[...])."
        )


def _check_fsdp1(modules: list[Any]) -> None:
    from torch.distributed.fsdp import ShardingStrategy

    for module in modules:
        if not getattr(module, "_use_orig_params", False):
            raise UnsupportedSetupError(
                "RELEX needs FSDP1 with use_orig_params=True (its parameters are otherwise FlatParameters that mix "
                "tensors). Set fsdp_config={'use_orig_params': True} (accelerate: fsdp_use_orig_params: true), or "
                "switch to FSDP2 (fsdp_version: 2)."
            )
        strategy = getattr(module, "sharding_strategy", None)
        sharded = strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP)
        if not sharded and not (strategy == ShardingStrategy.NO_SHARD and world_info()[1] == 1):
            raise UnsupportedSetupError(
                f"RELEX supports FSDP1 only with FULL_SHARD or SHARD_GRAD_OP, got {strategy}: replicated or hybrid "
                "shards would be counted more than once. Use FULL_SHARD, FSDP2 or DDP."
            )


def _fsdp1_orig_params(model: torch.nn.Module) -> dict[int, tuple[int, ...]]:
    """id(original parameter) → its full shape, for every parameter an FSDP1 FlatParameter manages."""
    managed: dict[int, tuple[int, ...]] = {}
    for module in _fsdp1_modules(model):
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None or getattr(flat, "_params", None) is None:
            continue
        for param, shape in zip(flat._params, flat._shapes, strict=True):
            managed[id(param)] = tuple(shape)
    return managed


def _fsdp2_modules(model: torch.nn.Module) -> tuple[Any, ...]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return ()
    return tuple(m for m in model.modules() if isinstance(m, FSDPModule))


def _reshard_fsdp2(items: Sequence[TrackedTensor]) -> None:
    """Free FSDP2's gathered copies of the items' parameters, so the next forward gathers the (written) shards."""
    modules = {id(m): m for item in items if isinstance(item, LocalShard) for m in item.fsdp_modules}
    for module in modules.values():
        module.reshard()


def _zero3_partition(name: str, param: torch.nn.Parameter) -> Zero3Partition:
    group = getattr(param, "ds_process_group", None)
    rank, world = world_info()
    group_rank = dist.get_rank(group=group) if _active() else 0
    group_size = dist.get_world_size(group=group) if _active() else 1
    if group_size != world:
        raise UnsupportedSetupError(
            f"RELEX needs ZeRO-3 partitions over all {world} processes, but {name!r} is partitioned over "
            f"{group_size} (MiCS / hpZ / sequence parallelism). Use plain ZeRO-3."
        )
    part = int(param.ds_tensor.ds_numel)
    valid = max(0, min(part, int(param.ds_numel) - group_rank * part))
    return Zero3Partition(name, param, 0, valid, full_shape=tuple(param.ds_shape))


def track_parameters(model: torch.nn.Module, chosen: Sequence[tuple[str, torch.nn.Parameter]]) -> list[TrackedTensor]:
    """The tracked items of ``chosen`` (name, parameter) pairs for this process (see the module docstring).

    Raises:
        UnsupportedSetupError: see :func:`detect_layout`.
    """
    layout = detect_layout(model)
    rank, world = world_info()
    fsdp1 = _fsdp1_orig_params(model) if layout == "fsdp1" else {}
    fsdp2 = _fsdp2_modules(model) if layout == "fsdp2" else ()
    items: list[TrackedTensor] = []
    for name, param in chosen:
        if hasattr(param, "ds_id"):
            items.append(_zero3_partition(name, param))
        elif hasattr(param, "_hp_mapping"):
            group = getattr(param, "_dp_group", None)
            if _active() and dist.get_world_size(group=group) != world:
                raise UnsupportedSetupError(
                    f"RELEX needs ZeRO-1/2 partitions over all {world} processes; {name!r} is partitioned over "
                    f"{dist.get_world_size(group=group)}."
                )
            items.append(ZeroFragment(name, param))
        elif _is_dtensor(param):
            _check_dtensor(name, param)
            items.append(LocalShard(name, param, full_shape=tuple(param.shape), fsdp_modules=fsdp2))
        elif id(param) in fsdp1:
            items.append(LocalShard(name, param, full_shape=fsdp1[id(param)]))
        elif world > 1:
            start, stop = partition_range(param.numel(), rank, world)
            items.append(ReplicatedSlice(name, param, start, stop))
        else:
            items.append(TrackedTensor(name, param))
    total = sum(p.numel() for _, p in chosen)
    local = sum(item.numel for item in items)
    logger.info("RELEX: %s layout; this process tracks %s of %s elements", layout, f"{local:,}", f"{total:,}")
    return items


# -- writing predictions into the live model ----------------------------------------------------------------


def _slices_by_bucket(items: list[ReplicatedSlice]) -> Iterator[list[ReplicatedSlice]]:
    """Group items so each process contributes at most about GATHER_BUCKET_ELEMENTS (same on every process)."""
    bucket: list[ReplicatedSlice] = []
    size = 0
    _, world = world_info()
    for item in items:
        share = -(-item.param.numel() // world)
        if bucket and size + share > GATHER_BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += share
    if bucket:
        yield bucket


@torch.no_grad()
def _gather_slices(
    items: list[ReplicatedSlice],
    values: dict[str, torch.Tensor],
    dtype: torch.dtype,
    receive: Callable[[ReplicatedSlice, int, torch.Tensor], None],
    dst: int | None,
    category: str,
) -> None:
    """All-gather (``dst=None``) or gather to ``dst`` every process's slice of ``items``.

    ``receive(item, offset, piece)`` is called for every (process, item) piece on the receiving processes.
    Sizes may differ between processes: offsets and lengths travel first, slices are padded to the longest.
    """
    rank, world = world_info()
    device = _reduce_device()
    for bucket in _slices_by_bucket(items):
        meta = torch.tensor([[item.offset, item.numel] for item in bucket], dtype=torch.int64, device=device).reshape(-1)
        local = torch.cat([values[item.name].reshape(-1).to(device, dtype) for item in bucket])
        if world == 1:
            metas, pieces = [meta], [local]
        else:
            metas = [torch.empty_like(meta) for _ in range(world)]
            _count(category, meta)
            dist.all_gather(metas, meta)
            longest = max(int(m.view(-1, 2)[:, 1].sum()) for m in metas)
            padded = torch.zeros(longest, dtype=dtype, device=device)
            padded[: local.numel()] = local
            _count(category, padded)
            if dst is None:
                pieces = [torch.empty_like(padded) for _ in range(world)]
                dist.all_gather(pieces, padded)
            else:
                pieces = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
                dist.gather(padded, pieces, dst=dst)
                if rank != dst:
                    continue
        for meta_q, piece_q in zip(metas, pieces, strict=True):
            position = 0
            for item, (offset, length) in zip(bucket, meta_q.view(-1, 2).tolist(), strict=True):
                if length:
                    receive(item, int(offset), piece_q[position : position + length])
                position += length


@torch.no_grad()
def write_prediction(tracked: Sequence[TrackedTensor], prediction: dict[str, torch.Tensor]) -> None:
    """Write ``prediction`` (name → this process's flat slice) into the live parameters, on every process.

    Collective: every process must call it. Replicated parameters (DDP, ZeRO-1/2 16-bit copies) receive
    every process's slice, so all processes end with identical weights; shards are edited in place; under
    DeepSpeed the fp32 master copy is written too, so the next optimizer step does not undo the edit.
    """
    replicated: dict[torch.dtype, list[ReplicatedSlice]] = defaultdict(list)
    zero3: list[Zero3Partition] = []
    _reshard_fsdp2(tracked)
    for item in tracked:
        if item.name not in prediction:
            continue
        value = prediction[item.name]
        if isinstance(item, ReplicatedSlice):
            if isinstance(item, ZeroFragment) and item.numel:
                item.view().copy_(value.to(item.view().device, torch.float32))
            replicated[item.param.dtype].append(item)
        elif isinstance(item, Zero3Partition):
            zero3.append(item)
        else:
            target = item.view()
            target.copy_(value.to(target.device, target.dtype))

    def receive(item: ReplicatedSlice, offset: int, piece: torch.Tensor) -> None:
        flat = item.full_flat()
        flat[offset : offset + piece.numel()].copy_(piece.to(flat.device, flat.dtype))

    # the tracked lists have the same structure on every process, so every process runs the same gathers
    for dtype in sorted(replicated, key=str):
        _gather_slices(replicated[dtype], prediction, dtype, receive, dst=None, category="prediction_all_gather")
    if zero3:
        _write_zero3(zero3, prediction)


@torch.no_grad()
def _write_zero3(items: list[Zero3Partition], prediction: dict[str, torch.Tensor]) -> None:
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    written = []
    for item in items:
        value = prediction[item.name].reshape(-1)
        master = safe_get_local_fp32_param(item.param).detach().clone().reshape(-1)
        master[: item.numel].copy_(value.to(master.device, master.dtype))
        safe_set_local_fp32_param(item.param, master)
        low = item.param.ds_tensor.data.reshape(-1)
        low[: item.numel].copy_(value.to(low.device, low.dtype))
        written.append(item.param)
    _regather_available(written)


def _regather_available(params: list[torch.nn.Parameter]) -> None:
    """Rebuild the gathered copies of ZeRO-3 parameters from their (written) partitions.

    ZeRO-3 keeps small ("persistent") parameters gathered between steps, and after a forward pass outside training
    (a probe's ``generate``) it leaves the others gathered too, so the next forward would use the old copies.
    Collective over every process; only gathered (``AVAILABLE``) parameters are touched, the same ones on every
    process since every process ran the same forward passes.
    """
    gathered = [p for p in params if getattr(getattr(p, "ds_status", None), "name", None) == "AVAILABLE"]
    if gathered:
        gathered[0].partition(param_list=gathered, has_been_updated=False)
        gathered[0].all_gather(param_list=gathered)


# -- gathering a full checkpoint -----------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A parameter name without FSDP1 / activation-checkpointing / torch.compile wrapper segments."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def _strip_ddp(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost model that has ``save_pretrained`` (strips DDP, FSDP1 and torch.compile wrappers)."""
    seen = model
    while not hasattr(seen, "save_pretrained"):
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None or inner is seen:
            break
        seen = inner
    return seen


@contextlib.contextmanager
def saving_gathered(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, ``model.config`` without the ``distributed_config`` of a model that transformers sharded
    itself (``from_pretrained(distributed_config=...)``), so that ``model.save_pretrained(dir, state_dict=...)`` on
    the main process writes the gathered ``state_dict`` it is given: with the setting, ``save_pretrained`` gathers
    the live shards instead, a collective the other processes never join (a hang, or the wrong weights)."""
    config = getattr(model, "config", None)
    setting = getattr(config, "distributed_config", None)
    if setting is None:
        yield
        return
    config.distributed_config = None
    try:
        yield
    finally:
        config.distributed_config = setting


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) → every (cleaned) name it has, tied duplicates included."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(clean_name(name))
    return names


@contextlib.contextmanager
def _swapped_into_shards(items: list[TrackedTensor], prediction: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily put the predicted local shards into the live (16-bit for ZeRO-3) parameters."""
    saved = []
    zero3 = [item.param for item in items if isinstance(item, Zero3Partition)]
    _reshard_fsdp2(items)
    try:
        for item in items:
            if isinstance(item, Zero3Partition):
                target = item.param.ds_tensor.data.reshape(-1)[: item.numel]
            else:
                target = item.view()
            saved.append((target, target.clone()))
            target.copy_(prediction[item.name].to(target.device, target.dtype))
        _regather_available(zero3)
        yield
    finally:
        for target, original in saved:
            target.copy_(original)
        _regather_available(zero3)


def _zero3_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather a ZeRO-3 model's 16-bit weights parameter by parameter (rank 0 keeps them, on CPU)."""
    import deepspeed

    main = is_main_process()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if main:
                state[clean_name(name)] = param.data.detach().to("cpu", copy=True)
    if main:
        for name, buffer in model.named_buffers():
            state[clean_name(name)] = buffer.detach().to("cpu", copy=True)
    return state


@torch.no_grad()
def gather_state_dict(
    model: torch.nn.Module, tracked: Sequence[TrackedTensor], prediction: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The full model state dict with ``prediction`` in place of the tracked tensors, on the main process.

    Collective: every process must call it; the others get ``None``. Replicated slices are gathered to
    the main process; sharded models go through the framework's own full-state-dict gather
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` for FSDP1/FSDP2, per-parameter
    ``GatheredParameters`` for ZeRO-3) with the predicted shards swapped in for the duration. The live
    weights are left as they were.
    """
    main = is_main_process()
    model = _strip_ddp(model)
    replicated: dict[torch.dtype, list[ReplicatedSlice]] = defaultdict(list)
    sharded: list[TrackedTensor] = []
    plain: list[TrackedTensor] = []
    for item in tracked:
        if isinstance(item, ReplicatedSlice):
            replicated[item.param.dtype].append(item)
        elif isinstance(item, (LocalShard, Zero3Partition)):
            sharded.append(item)
        else:
            plain.append(item)
    overrides: dict[int, torch.Tensor] = {}
    for dtype in sorted(replicated, key=str):
        items = replicated[dtype]
        if main:
            for item in items:
                overrides[id(item.param)] = torch.empty(item.param.numel(), dtype=dtype)

        def receive(item: ReplicatedSlice, offset: int, piece: torch.Tensor) -> None:
            overrides[id(item.param)][offset : offset + piece.numel()].copy_(piece.cpu())

        _gather_slices(items, prediction, dtype, receive, dst=0, category="state_dict_gather")
    for item in plain:
        if main:
            overrides[id(item.param)] = prediction[item.name].to("cpu", item.param.dtype)
    layout = detect_layout(model)
    if layout in ("fsdp1", "fsdp2", "deepspeed-zero3"):
        with _swapped_into_shards(sharded, prediction):
            if layout == "deepspeed-zero3":
                state = _zero3_full_state_dict(model)
            else:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                # offloading tensors that already live on the CPU crashes FSDP1 (torch 2.13): offload from accelerators only
                offload = any(p.device.type != "cpu" for p in model.parameters())
                state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
                state = {k: v.cpu() for k, v in state.items()} if main else {}
    else:
        state = model.state_dict() if main else {}
        state = {clean_name(k): v for k, v in state.items()}
    if not main:
        return None
    aliases = _aliases(model)
    params = {id(item.param): item.param for item in tracked}
    for key, value in overrides.items():
        shape = getattr(params[key], "ds_shape", None) or params[key].shape
        for name in aliases.get(key, []):
            if name in state:
                state[name] = value.view(shape)
    return state
