"""RELEX in verl (0.9.1) with verl's real classes, on CPU: the plugin entry point, the composed Hydra config, the
refusals, the trainer in sync mode, and halt/jump/resume through a real Ray worker group whose two ranks hold
FSDP2 shards over gloo, checked against an independent SVD + least-squares oracle on the full weights.

These tests run in their own virtual environment (verl pins transformers < 5.11): ``scripts/test.sh`` creates
``.venv-verl`` and runs them; in the main environment they are skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# the verl package itself (a bare "verl" could resolve to a namespace package of some folder on sys.path)
pytest.importorskip("verl.trainer.ppo.v1", reason="verl is installed in .venv-verl (scripts/test.sh runs these tests there)")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "integrations" / "verl"
sys.path.insert(0, str(REPO / "tests"))
from _oracle import max_diff, oracle  # noqa: E402

pytestmark = pytest.mark.verl


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(OVERLAY), version_base=None):
        return hydra_compose(config_name="relex_grpo", overrides=list(overrides))


def test_plugin_entry_point_registers_the_trainer_in_a_fresh_interpreter():
    """`import verl` alone (no import of relex_callback) must make trainer mode "relex" resolvable."""
    code = ("import sys, verl\nfrom verl.trainer.ppo.v1 import get_trainer_cls\n"
            "cls = get_trainer_cls('relex')\nprint(cls.__module__, cls.__name__, 'relex_callback' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["relex_callback.trainers.verl", "RelexPPOTrainer", "True"], out.stdout


def test_overlay_config_composes_with_verl_and_maps_onto_relex_config():
    from relex_callback.trainers.verl import check_verl_setup

    cfg = compose("relex.observe=12", "+relex.snapshot_every=2", "trainer.default_local_dir=/tmp/run")
    assert cfg.trainer.v1.trainer_mode == "relex" and cfg.algorithm.adv_estimator == "grpo"
    settings = check_verl_setup(cfg)
    assert (settings.observe, settings.snapshot_every, settings.extrapolate_to) == (12, 2, "auto")
    assert settings.output_dir == "/tmp/run"  # defaults to verl's checkpoint root
    assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size > 0  # verl's own defaults are all there


@pytest.mark.parametrize("overrides, names", [
    (["+relex.obsrve=3"], ["obsrve"]),
    (["relex.observe=0"], ["observe"]),
    (["actor_rollout_ref.actor.strategy=megatron"], ["actor_rollout_ref.actor.strategy", "fsdp2"]),
    (["actor_rollout_ref.actor.strategy=fsdp"], ["use_orig_params=true"]),
    (["actor_rollout_ref.actor.fsdp_config.fsdp_size=2"], ["fsdp_size=-1"]),
    (["trainer.use_v1=false"], ["trainer.use_v1"]),
    (["~relex"], ["relex:"]),
])
def test_unsupported_setups_are_refused_before_any_worker_starts(overrides, names):
    from relex_callback.trainers.verl import RelexPPOTrainer

    cfg = compose(*overrides)
    with pytest.raises(ValueError) as error:
        RelexPPOTrainer(cfg)  # refused in __init__, before verl's trainer is built (no Ray, no workers)
    for name in names:
        assert name in str(error.value), str(error.value)


def test_fsdp1_with_orig_params_is_accepted():
    from relex_callback.trainers.verl import check_verl_setup

    check_verl_setup(compose("actor_rollout_ref.actor.strategy=fsdp", "actor_rollout_ref.actor.fsdp_config.use_orig_params=true"))


def test_trainer_builds_as_verl_sync_trainer_with_the_relex_worker(tmp_path):
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    from relex_callback.trainers.verl import RelexActorRolloutRefWorker, RelexPPOTrainer

    cfg = compose(f"trainer.default_local_dir={tmp_path}")
    trainer_cls = get_trainer_cls(cfg.trainer.v1.trainer_mode)  # what verl's TaskRunnerV1 does
    assert trainer_cls is RelexPPOTrainer and issubclass(trainer_cls, PPOTrainerSync)
    trainer = trainer_cls(config=cfg)
    assert trainer.trainer_mode == "sync" and cfg.trainer.v1.trainer_mode == "sync"  # never the async code paths
    assert trainer.relex_config.observe == 20
    trainer._init_resource_pool_mgr()  # verl's role → worker mapping, with RELEX's worker for the actor
    actor_roles = [r for r in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef) if r in trainer.role_worker_mapping]
    assert actor_roles
    for role in actor_roles:
        assert trainer.role_worker_mapping[role].__ray_metadata__.modified_class.__mro__[1] is RelexActorRolloutRefWorker


# -- the worker methods through a real Ray worker group, FSDP2 over two gloo ranks ---------------------------

WORLD = 2
OBSERVE = 6
MINIBATCHES = 3


@pytest.fixture(scope="module")
def ray_cluster():
    import os

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=4 * WORLD,  # logical CPUs: placement groups of finished worker groups stay reserved
             include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "with_verl")]),
                                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def worker_group(cfg, lr: float = 2e-2):
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from _verl_workers import TinyActorWorker

    pool = RayResourcePool([WORLD], use_gpu=False, max_colocate_count=1)
    init = RayClassWithInitArgs(cls=ray.remote(TinyActorWorker), config=cfg.actor_rollout_ref, role="actor")
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=init)
    assert group.build_tiny_actor(lr, MINIBATCHES) == [WORLD, WORLD]
    return group


def test_halt_mode_through_the_worker_group_matches_the_oracle_and_resumes(ray_cluster, tmp_path):
    from relex_callback.trainers.verl import check_verl_setup

    cfg = compose(f"trainer.default_local_dir={tmp_path}", f"relex.observe={OBSERVE}", "relex.extrapolate_to=[12]")
    settings = check_verl_setup(cfg).to_dict()
    group = worker_group(cfg)
    weights = {0: group.full_weights()[0]}
    info = group.relex_begin(settings, 0, None)
    assert info[0]["buffer_bytes"] > 0 and info[0]["buffer_bytes"] == info[1]["buffer_bytes"]  # each rank: its half
    for step in range(1, OBSERVE + 1):
        group.update(step)
        weights[step] = group.full_weights()[0]
        outcomes = group.relex_after_step(step)
        if step == 3:  # verl's order: the step's update, RELEX, then the checkpoint
            assert all(group.relex_save(str(tmp_path / "global_step_3" / "relex")))
        assert outcomes[0]["metrics"]["relex/optimizer_steps"] == MINIBATCHES  # the post-step hook saw each update
        assert [o["halted"] for o in outcomes] == [step == OBSERVE] * WORLD
    moved = max(float((weights[OBSERVE][n] - weights[0][n]).abs().max()) for n in weights[0])
    assert moved > 1e-3  # training really moved the weights
    written = Path(outcomes[0]["written"][0])
    assert written == tmp_path / "relex-step12" / "actor" / "huggingface"
    assert (written / "relex_report.json").is_file() and (written / "README.md").is_file()
    saved = load_file(str(next(written.glob("*.safetensors"))))
    expected = oracle(weights, 0, list(range(1, OBSERVE + 1)), 12.0, round_to=torch.bfloat16)
    assert max_diff({n: saved[n].float() for n in expected}, expected) < 2e-2  # bf16 output of a fp32 oracle
    assert "relex/supported_step" in outcomes[0]["metrics"] and outcomes[0]["metrics"]["relex/target_step"] == 12

    # resume at step 3 from the saved window (fresh workers, the real weights of step 3 restored): same model
    import ray

    for worker in group.workers:
        ray.kill(worker)
    resumed = worker_group(compose(f"trainer.default_local_dir={tmp_path}"))
    for step in range(1, 4):
        resumed.update(step)
    assert max_diff(resumed.full_weights()[0], weights[3]) == 0  # the real weights of step 3 (verl restores them)
    settings["overwrite"] = True
    resumed.relex_begin(settings, 3, str(tmp_path / "global_step_3" / "relex"))
    for step in range(4, OBSERVE + 1):
        resumed.update(step)
        again = resumed.relex_after_step(step)
    assert again[0]["halted"]
    for worker in resumed.workers:
        ray.kill(worker)
    redo = load_file(str(next(written.glob("*.safetensors"))))
    assert all(torch.equal(redo[n], saved[n]) for n in saved)  # bit-identical to the uninterrupted run


def test_jump_mode_moves_every_shard_like_the_full_tensor_jump(ray_cluster, tmp_path):
    import ray

    from relex_callback.trainers.verl import check_verl_setup

    cfg = compose(f"trainer.default_local_dir={tmp_path}", "relex.mode=jump", "relex.observe=4", "relex.extrapolate_to=null",
                  "+relex.jump_every=2", "+relex.jump_horizon=4", "+relex.auto_horizon=false")
    group = worker_group(cfg)
    weights = {0: group.full_weights()[0]}
    group.relex_begin(check_verl_setup(cfg).to_dict(), 0, None)
    for step in range(1, 5):
        group.update(step)
        weights[step] = group.full_weights()[0]
        outcomes = group.relex_after_step(step)
    jump = outcomes[0]["jump"]
    assert jump["status"] == "accepted" and (jump["virtual_step"], jump["virtual_step_after"]) == (4, 8)
    assert outcomes[0]["metrics"]["relex/jump_accepted"] == 1.0
    untimed = [{k: v for k, v in o["jump"].items() if not k.endswith("_seconds")} for o in outcomes]
    assert untimed[0] == untimed[1]  # every rank took the same decision
    jumped = group.full_weights()[0]
    expected = oracle(weights, 0, [1, 2, 3, 4], 8.0, round_to=torch.bfloat16)
    assert max_diff(jumped, expected) < 1e-4  # θ̂(8) = θ_0 + ĉ(8)·v, computed shard by shard
    assert max_diff(jumped, weights[4]) > 1e-3  # and the jump did move the weights
    assert (tmp_path / "relex_jumps.jsonl").is_file()
    for worker in group.workers:
        ray.kill(worker)
