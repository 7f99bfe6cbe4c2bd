"""RELEX metrics reach a real reporting integration (transformers' TensorBoardCallback, read back from its event
files) at the step they belong to, and the trainer's callbacks keep the order the user gave them."""

import pytest
import torch
from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers.integrations import TensorBoardCallback  # noqa: E402

from relex_callback import RelexCallback  # noqa: E402


class TinyConfig(PretrainedConfig):
    model_type = "relex-reporting-tiny"


class Tiny(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config=None):
        super().__init__(config or TinyConfig())
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x, labels=None):
        pred = torch.tensor(x, dtype=torch.float32) @ self.w if not torch.is_tensor(x) else x @ self.w
        return {"loss": torch.nn.functional.mse_loss(pred.sum(-1), labels)}


class Order(TrainerCallback):
    """A user's own callback listed before RELEX: records when its on_step_end runs."""

    def __init__(self, relex):
        self.relex, self.seen_halted = relex, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.seen_halted[state.global_step] = self.relex._halted


def train(tmp_path, bind: bool, report_to="tensorboard", extra=()):
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"x": data.tolist(), "labels": data.sum(-1).tolist()})
    relex = RelexCallback(observe=3, extrapolate_to=6, save_model=False, buffer_dtype="float32")
    order = Order(relex)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=10, learning_rate=1e-2,
                             use_cpu=True, report_to=report_to, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=dataset, callbacks=[order, relex, *extra])
    if bind:
        relex.set_trainer(trainer)
    before = list(trainer.callback_handler.callbacks)
    trainer.train()
    assert trainer.callback_handler.callbacks == before  # nothing reordered
    return trainer, relex, order


def scalars(tmp_path):
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_reach_tensorboard_through_trainer_log(tmp_path):
    trainer, relex, order = train(tmp_path, bind=True)
    assert trainer.state.global_step == 3
    tags = scalars(tmp_path)
    (step, ratio), = tags["train/relex/horizon_ratio"]
    assert step == 3 and ratio == pytest.approx(6 / 3)
    report = relex.reports[6]
    (_, distance), = tags["train/relex/backtest_distance"]
    assert distance == pytest.approx(report["backtest"]["distance"], rel=1e-6)
    # the trainer's own loss log of the halt step was kept
    assert [s for s, _ in tags["train/loss"]] == [1, 2, 3]
    # the user's callback listed first runs first (before the halt), as listed
    assert order.seen_halted == {1: False, 2: False, 3: False}
    assert sum("relex/horizon_ratio" in entry for entry in trainer.state.log_history) == 1


def test_without_the_trainer_metrics_reach_the_callbacks_after_relex(tmp_path):
    tensorboard = TensorBoardCallback()
    trainer, _, _ = train(tmp_path, bind=False, report_to=[], extra=(tensorboard,))
    tags = scalars(tmp_path)
    assert [s for s, _ in tags["train/relex/horizon_ratio"]] == [3]
    assert sum("relex/horizon_ratio" in entry for entry in trainer.state.log_history) == 1


def test_negative_control_integrations_before_an_unbound_callback_miss_the_metrics(tmp_path):
    trainer, _, _ = train(tmp_path, bind=False)
    tags = scalars(tmp_path)
    assert "train/loss" in tags and "train/relex/horizon_ratio" not in tags
    assert any("relex/horizon_ratio" in entry for entry in trainer.state.log_history)  # trainer_state.json has them
