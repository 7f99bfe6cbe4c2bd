"""Worker for ``tests/test_faults.py``: a tiny real ``Trainer`` run with a ``RelexCallback`` (or a ``relex`` command)
that is killed with SIGKILL at a chosen point, or run under torchrun to save and resume RELEX state with 2 processes.

``python tests/_fault_worker.py OUT FAULT ARGS_JSON`` (ARGS_JSON: the ``RelexCallback`` arguments; the run keeps a
checkpoint every 2 steps, only the newest):

* ``state:K``: while writing the RELEX state into ``checkpoint-K``: the temporary file gets half its bytes, then SIGKILL;
* ``output``: while writing the extrapolated model folder: its ``relex_report.json`` gets half its bytes, then SIGKILL;
* ``fit``: in the fit, after the Grams are summed and before the trend is fitted, SIGKILL;
* ``cli`` (ARGS_JSON: the ``relex`` command line): ``relex_report.json`` of the output folder gets half its bytes,
  then SIGKILL;
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


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half_json_then_die(path, payload) -> None:
    text = json.dumps(payload, default=str)
    with open(path, "w") as handle:
        handle.write(text[: len(text) // 2])
    _die()


def kill_in_state_save(step: int) -> None:
    import relex_callback.engine.engine as engine_module

    real = engine_module.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if Path(filename).parent.name == f"checkpoint-{step}":
            os.truncate(filename, os.path.getsize(filename) // 2)
            _die()

    engine_module.save_file = save_file


def kill_in_fit() -> None:
    import relex_callback.engine.engine as engine_module

    def fit_trajectory(*args, **kwargs):
        _die()

    engine_module.fit_trajectory = fit_trajectory


def cli_killed_in_output_write(argv: list[str]) -> None:
    import relex_callback.offline.commands as commands_module
    from relex_callback.offline.cli import main

    commands_module.write_json = _half_json_then_die
    main(argv)


def ddp_save_then_resume(out: Path, config: dict, one_process_checkpoint: str) -> None:
    import torch.distributed as dist

    from _tiny import StopAt, lm_trainer, tiny_tokenizer
    from relex_callback import RelexCallback

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


def main(out: Path, fault: str, arguments) -> None:
    if fault.startswith("ddp:"):
        ddp_save_then_resume(out, arguments, fault.removeprefix("ddp:"))
        return
    if fault == "cli":
        cli_killed_in_output_write(arguments)
        raise SystemExit("the fault was never reached")
    if fault.startswith("state:"):
        kill_in_state_save(int(fault.removeprefix("state:")))
    elif fault == "output":
        import relex_callback.engine.window as window_module  # write_model_dir, every adapter's model-directory writer

        window_module.write_json = _half_json_then_die
    elif fault == "fit":
        kill_in_fit()
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from _tiny import lm_trainer, tiny_tokenizer
    from relex_callback import RelexCallback

    lm_trainer(out, tiny_tokenizer(chat_template=False), [RelexCallback(**arguments)], save_steps=2,
               save_total_limit=1).train()
    raise SystemExit("the fault was never reached")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))
