"""Worker for ``tests/test_faults.py``: a tiny real ``Trainer`` run with a ``RelexCallback`` that is killed with
SIGKILL at a chosen point, or run under torchrun to save and resume RELEX state with 2 processes.

``python tests/_fault_worker.py OUT FAULT CONFIG_JSON`` (CONFIG_JSON: the ``RelexCallback`` arguments; a checkpoint
every 2 steps, only the newest kept):

* ``state:K``: while writing the RELEX state into ``checkpoint-K``: the temporary file gets half its bytes, then SIGKILL;
* ``output``: while writing the extrapolated model folder: its ``relex_report.json`` gets half its bytes, then SIGKILL;
* ``fit``: in the fit, after the Grams are summed and before the trend is fitted, SIGKILL;
* ``ddp:DIR`` (under ``torchrun --nproc_per_node 2``, gloo): train to step 4 (checkpoint-4 holds one state file per
  process), then resume from ``DIR``, a checkpoint saved by one process; each rank writes the error it got to
  ``OUT/refusal-rank{r}.txt``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny import StopAt, lm_trainer, tiny_tokenizer  # noqa: E402

import relex_callback.engine.engine as engine_module  # noqa: E402
import relex_callback.trainers.transformers as transformers_module  # noqa: E402
from relex_callback import RelexCallback  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_state_save(step: int) -> None:
    real = engine_module.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if Path(filename).parent.name == f"checkpoint-{step}":
            os.truncate(filename, os.path.getsize(filename) // 2)
            _die()

    engine_module.save_file = save_file


def kill_in_output_write() -> None:
    def write_json(path, payload):
        text = json.dumps(payload, default=str)
        with open(path, "w") as handle:
            handle.write(text[: len(text) // 2])
        _die()

    transformers_module.write_json = write_json


def kill_in_fit() -> None:
    def fit_trajectory(*args, **kwargs):
        _die()

    engine_module.fit_trajectory = fit_trajectory


def ddp_save_then_resume(out: Path, config: dict, one_process_checkpoint: str) -> None:
    import torch.distributed as dist

    tok = tiny_tokenizer(chat_template=False)
    lm_trainer(out, tok, [RelexCallback(**config), StopAt(4)], ddp_backend="gloo", per_device_train_batch_size=4).train()
    rank = dist.get_rank()
    resumed = lm_trainer(out / "resumed", tok, [RelexCallback(**config)], ddp_backend="gloo", per_device_train_batch_size=4,
                         resume_from_checkpoint=one_process_checkpoint)
    try:
        resumed.train(resume_from_checkpoint=one_process_checkpoint)
        message = "no error"
    except ValueError as err:
        message = str(err)
    (out / f"refusal-rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def main(out: Path, fault: str, config: dict) -> None:
    if fault.startswith("ddp:"):
        ddp_save_then_resume(out, config, fault.removeprefix("ddp:"))
        return
    if fault.startswith("state:"):
        kill_in_state_save(int(fault.removeprefix("state:")))
    elif fault == "output":
        kill_in_output_write()
    elif fault == "fit":
        kill_in_fit()
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    lm_trainer(out, tiny_tokenizer(chat_template=False), [RelexCallback(**config)], save_steps=2,
               save_total_limit=1).train()
    raise SystemExit("the fault was never reached")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))
