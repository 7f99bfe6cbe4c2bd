"""``relex``: RELEX from checkpoints already on disk (extrapolate, reconstruct, report).

Each subcommand parses its options and calls one library function of :mod:`relex_callback.offline`;
input problems are printed as one ``relex: error: ...`` message with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import sys
from typing import Sequence

from ..options import DEFAULT_BACKTEST_TOLERANCE, OUTPUT_DTYPES, TREND_KINDS

__all__ = ["main", "build_parser"]

logger = logging.getLogger("relex_callback")

_CHECKPOINT_HELP = (
    "checkpoint directories, or folders holding step-named ones: plain Hugging Face model directories "
    "(model.safetensors or shards with model.safetensors.index.json), checkpoint-N/ (transformers, TRL), "
    "global_step_N/actor/huggingface/ (verl), global_step_N/, step_N/ or stepN/. Shell globs work."
)

_EXTRAPOLATE_EPILOG = """\
examples:
  # the paper's RELEX: rank 1, linear in the step, from the TRL checkpoints of the first 75 steps to step 500
  relex extrapolate --base Qwen3-4B-Base --checkpoints runs/grpo/checkpoint-* \\
      --fit-steps 75 --target-step 500 --output relex-step500

  # several targets (one directory per target: out/step300, out/step500), verl layout, float32 output
  relex extrapolate --base base_model --checkpoints verl_ckpts/ --target-step 300 500 \\
      --dtype float32 --output out

  # reproduce the released RELEX-Qwen2.5-Math-1.5B ("step 500" is the line at step 1000)
  relex extrapolate --base Qwen2.5-Math-1.5B --checkpoints rlvr_traj/ --fit-steps 75 \\
      --target-step 500 --time-scale 2 --output RELEX-Qwen2.5-Math-1.5B

Step numbers come from the directory names (or --steps) and the line is fitted on them, so unevenly
spaced checkpoints are fine. The output is written into a hidden temporary directory next to --output
and renamed to it only when complete.
"""

_RECONSTRUCT_EPILOG = """\
examples:
  # project step 75 onto the rank-1 subspace of steps 1..75 (the paper's Finding-1 check)
  relex reconstruct --base base_model --checkpoints rlvr_traj/ --fit-steps 75 --target-step 75 --output rec75

  # rank 5, several observed steps (out/step50, out/step100; step 100 is held out of the subspace)
  relex reconstruct --base base_model --checkpoints rlvr_traj/ --fit-steps 75 --rank 5 \\
      --target-step 50 100 --output out
"""

_REPORT_EPILOG = """\
examples:
  # is this run extrapolatable? fit on steps <= 50, check the fit against the later checkpoints
  relex report --base base_model --checkpoints runs/grpo/ --fit-steps 50 --output report/

  # extend the plotted lines to the step you intend to extrapolate to, no plots, rank 2
  relex report --base base_model --checkpoints runs/grpo/ --target-step 500 --rank 2 --no-plots --output report/

Writes relex_report.json (per-tensor explained variance, singular values, in- and out-of-window R²,
backtest) and explained_variance.png, coefficients.png, r_squared.png. No weights are written.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _target_step(text: str) -> int:
    """A target step of extrapolate/report: a training step >= 1 (a step inside the window keeps its warning)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is not a training step: give a step >= 1, after the last checkpoint to extrapolate "
            "(e.g. --target-step 500)")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a misspelled option, command or choice (argparse does this only from
    Python 3.14 on)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._given = list(sys.argv[1:] if args is None else args)  # for the suggestion of error()
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        hint = _suggestion(self, message, getattr(self, "_given", []))
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def _suggestion(parser: argparse.ArgumentParser, message: str, given: Sequence[str]) -> str:
    """``"; did you mean ...?"`` for a misspelled command or choice named in an argparse error message, or for the
    first option among ``given`` (or the unrecognized arguments) that this parser does not know; else ``""``."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        wrong, known = choice.group(1), re.findall(r"'([^']*)'", choice.group(2)) or choice.group(2).split(", ")
    else:
        known = [o for a in parser._actions for o in a.option_strings]
        unrecognized = re.search(r"unrecognized arguments: (.*)", message)
        tokens = unrecognized.group(1).split() if unrecognized else given
        words = [w.split("=", 1)[0] for w in tokens if w.startswith("-") and not re.match(r"-\d", w)]
        words = [w for w in words if not any(o.startswith(w) for o in known)]  # known options and abbreviations
        if not words:
            return ""
        wrong = words[0]
    match = difflib.get_close_matches(wrong, known, n=1, cutoff=0.6)
    if not match:
        return ""
    return f"; did you mean {match[0]}?" if choice else f" ({wrong} is not an option here: did you mean {match[0]}?)"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer step") from None


def _nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (a training step)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _add_inputs(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("inputs")
    group.add_argument("--base", required=True, metavar="BASE_DIR",
                       help="the model the deltas start from (θ_0), a Hugging Face directory: the model before RL, or "
                            "a checkpoint of the run. Example: --base Qwen3-4B-Base")
    group.add_argument("--base-step", type=_nonnegative_int, metavar="N",
                       help="the training step of --base (the trend's origin). Default: the step in its directory name "
                            "(checkpoint-N, global_step_N, ...), else 0. Example: --base runs/checkpoint-100 --base-step 100")
    group.add_argument("--checkpoints", required=True, nargs="+", metavar="CKPT",
                       help=_CHECKPOINT_HELP + " Example: --checkpoints runs/grpo/checkpoint-*")
    group.add_argument("--steps", nargs="+", type=_int, metavar="N",
                       help="the step of each checkpoint, in the order found (each CKPT in turn, a folder's "
                            "step-named subdirectories in step order), instead of parsing directory names. "
                            "Example: --steps 10 20 40 80")
    group.add_argument("--fit-steps", type=_int, metavar="N",
                       help="use only checkpoints with step <= N for the subspace and the fit (the official "
                            "--history_steps); later ones are ignored by extrapolate and held out by report and "
                            "reconstruct. Default: all. Example: --fit-steps 75")
    group.add_argument("--allow-pickle", action="store_true",
                       help="accept pickled .bin/.pt weights, loaded with torch.load(weights_only=True). Off by "
                            "default: unpickling untrusted files can run code. Example: --allow-pickle")
    return group


def _add_resources(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output and resources")
    group.add_argument("--max-memory", default="1GiB", metavar="SIZE",
                       help="budget of the working buffers (the deltas of one tensor chunk for every snapshot, θ_0, "
                            "the output chunk); a tensor that does not fit is processed in chunks and read twice. "
                            "About 250 MB of interpreter and torch come on top. Default: 1GiB. "
                            "Example: --max-memory 8GiB")
    group.add_argument("--num-workers", type=_positive_int, metavar="N",
                       help="threads reading checkpoints in parallel. Default: the CPU count, 2 to 8. "
                            "Example: --num-workers 16")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an existing non-empty output directory (only once the new one is complete). "
                            "Example: --overwrite")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar. Example: --no-progress")
    group.add_argument("-v", "--verbose", action="store_true", help="log debug messages. Example: -v")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only. Example: -q")
    return group


def _add_model(parser: argparse.ArgumentParser, trend: bool) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument("--rank", type=_positive_int, default=1, metavar="R",
                       help="singular directions kept per tensor (r; the paper uses 1). Default: 1. Example: --rank 2")
    if trend:
        group.add_argument("--window", type=_positive_int, metavar="W",
                           help="fit the trend on the last W fit snapshots only; the subspace still uses all "
                                "of them (as the official --window). Default: all. Example: --window 20")
        group.add_argument("--fit", choices=TREND_KINDS, default="linear",
                           help="trend of the coefficients c_t over the step: linear (the paper, least squares "
                                "with a free intercept), power (a + b·t^p, see --power) or poly2 (quadratic). "
                                "Default: linear. Example: --fit poly2")
        group.add_argument("--power", type=_positive_float, default=1.0, metavar="P",
                           help="exponent p of the power trend (1 is the line, 0.5 follows √t growth); used with "
                                "--fit power. Default: 1. Example: --fit power --power 0.5")
        group.add_argument("--time-scale", type=_positive_float, default=1.0, metavar="S",
                           help="multiply every target step by S before evaluating the trend (history steps are "
                                "unchanged). The official script silently uses 2 for Qwen2.5-Math-1.5B; never "
                                "inferred here. Default: 1. Example: --time-scale 2")
        group.add_argument("--backtest-tolerance", type=_positive_float, default=DEFAULT_BACKTEST_TOLERANCE, metavar="D",
                           help="largest acceptable backtest distance ||θ̂ − θ|| / ||θ − θ_0|| (fit the first half, "
                                "predict the last snapshot); targets beyond the horizon it supports get a warning. "
                                "Default: 0.75. Example: --backtest-tolerance 0.5")
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="relex",
        description="RELEX (arXiv 2605.21468) from checkpoints already on disk: per tensor, the rank-r subspace of "
                    "the deltas θ_t − θ_0 and a trend of its coefficients over the real step numbers. Streams the "
                    "checkpoints; writes no delta files.",
        epilog="Run `relex COMMAND --help` for the options and examples of each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ex = commands.add_parser(
        "extrapolate", help="write the predicted model at target step(s) K",
        description="Write θ̂(K) = θ_0 + Σ_i ĉ_i(S·K) v_i per tensor for each target step K.",
        epilog=_EXTRAPOLATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = _add_inputs(ex)
    inputs.add_argument("--target-step", required=True, nargs="+", type=_target_step, metavar="K",
                        help="step(s) to extrapolate to; one output directory per target (OUT/step{K} when "
                             "several). Example: --target-step 500")
    model = _add_model(ex, trend=True)
    model.add_argument("--shrink", type=_positive_float, default=1.0, metavar="λ",
                       help="keep θ_N + λ(θ̂ − θ_N), θ_N the last fit snapshot; λ in (0, 1]. Default: 1 (the paper). "
                            "Example: --shrink 0.5")
    output = _add_resources(ex)
    output.add_argument("--output", required=True, metavar="OUT_DIR",
                        help="output model directory (created; refused when it exists and is not empty unless "
                             "--overwrite). Example: --output relex-step500")
    output.add_argument("--dtype", choices=OUTPUT_DTYPES, default="auto",
                        help="dtype of the floating tensors written; auto keeps each tensor's dtype in the base. "
                             "Default: auto. Example: --dtype bfloat16")

    rec = commands.add_parser(
        "reconstruct", help="project observed checkpoints onto the rank-r subspace (Finding-1 check)",
        description="Write θ_0 + V_r V_rᵀ (θ_t − θ_0) for observed steps t, V_r from the fit snapshots.",
        epilog=_RECONSTRUCT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = _add_inputs(rec)
    inputs.add_argument("--target-step", nargs="+", type=_int, metavar="K",
                        help="observed step(s) to reconstruct. Default: the last fit step. Example: --target-step 50 75")
    _add_model(rec, trend=False)
    output = _add_resources(rec)
    output.add_argument("--output", required=True, metavar="OUT_DIR",
                        help="output model directory (OUT/step{K} when several steps). Example: --output rec75")
    output.add_argument("--dtype", choices=OUTPUT_DTYPES, default="auto",
                        help="dtype of the floating tensors written; auto keeps the base's. Example: --dtype float32")

    rep = commands.add_parser(
        "report", help="diagnostics only: explained variance, R², backtest, plots",
        description="Tell, before spending compute, whether a run looks extrapolatable.",
        epilog=_REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = _add_inputs(rep)
    inputs.add_argument("--target-step", nargs="+", type=_target_step, metavar="K",
                        help="step(s) you intend to extrapolate to: the plotted lines extend to them and the "
                             "horizon ratios are reported. Example: --target-step 500")
    _add_model(rep, trend=True)
    output = _add_resources(rep)
    output.add_argument("--output", required=True, metavar="REPORT_DIR",
                        help="directory for relex_report.json and the PNG plots. Example: --output report/")
    output.add_argument("--top", type=int, default=6, metavar="N",
                        help="plot the coefficient trajectories of the N largest tensors. Default: 6. Example: --top 4")
    output.add_argument("--no-plots", action="store_true", help="write the JSON only. Example: --no-plots")
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# The library's keyword names in its messages, as the options of this command line.
_KEYWORDS = ("base_step", "rank", "window", "shrink", "power", "time_scale", "top", "num_workers", "fit", "dtype", "max_memory",
             "fit_steps", "backtest_tolerance")


def _cli_wording(message: str) -> str:
    """A library message in the command line's words: ``window=1`` becomes ``--window 1``."""
    message = message.replace(" (overwrite=True)", "")
    return re.sub(r"\b(%s)=(\S+?)(?=[\s,;:]|$)" % "|".join(_KEYWORDS),
                  lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", message)


def _snapshot_lines(diagnostic: dict, steps: Sequence[int], base_step: int) -> list[str]:
    """The supported horizon and, when the snapshots are not every step after the base (a RelexCallback observes every
    step), that a callback's K_max over the same window can differ."""
    lines = [f"supported horizon K_max = step {diagnostic['k_max']} ({diagnostic['k_max_ratio']:.2f}x the window) "
             f"from {len(steps)} snapshots at steps {_steps_list(steps)}"]
    if list(steps) != list(range(base_step + 1, steps[-1] + 1)):
        lines.append(f"note: these are not every step {base_step + 1}..{steps[-1]}; a RelexCallback that observed every step sees "
                     "other snapshots, so its K_max and backtest can differ from these")
    return lines


def _steps_list(steps: Sequence[int]) -> str:
    text = [str(s) for s in steps]
    return ", ".join(text) if len(text) <= 12 else ", ".join(text[:5] + ["..."] + text[-3:])


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    package = logging.getLogger("relex_callback")
    package.handlers = [handler]
    package.setLevel(level)
    package.propagate = False


def _run(args: argparse.Namespace) -> None:
    from . import commands as offline

    common = dict(
        steps=args.steps,
        base_step=args.base_step,
        fit_steps=args.fit_steps,
        rank=args.rank,
        max_memory=args.max_memory,
        num_workers=args.num_workers,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if args.command == "extrapolate":
        reports = offline.extrapolate_checkpoints(
            args.base, args.checkpoints, args.target_step, args.output, fit=args.fit, power=args.power, window=args.window,
            time_scale=args.time_scale, shrink=args.shrink, dtype=args.dtype,
            backtest_tolerance=args.backtest_tolerance, **common,
        )
        for report in reports:
            ev = report["explained_variance"]
            where = args.output if len(reports) == 1 else os.path.join(args.output, f"step{report['target_step']}")
            print(
                f"step {report['target_step']} (effective {report['effective_target_step']:g}, "
                f"{report['horizon_ratio']:.2f}x the observed window) -> {where}: {ev.get('tensors', 0)} tensors, "
                f"mean explained variance {ev.get('mean', float('nan')):.3f}, {report['bytes']['written'] / 2**20:.1f} MiB"
            )
        for line in _snapshot_lines(reports[0]["diagnostic"], reports[0]["observed_steps"], reports[0]["settings"]["base_step"]):
            print(line)
    elif args.command == "reconstruct":
        reports = offline.reconstruct_checkpoints(
            args.base, args.checkpoints, args.output, target_steps=args.target_step, dtype=args.dtype, **common
        )
        for report in reports:
            where = args.output if len(reports) == 1 else os.path.join(args.output, f"step{report['target_step']}")
            print(f"step {report['target_step']} -> {where}: relative distance to the real weights "
                  f"{report['relative_distance']:.4f}")
    else:
        report = offline.report_checkpoints(
            args.base, args.checkpoints, args.output, fit=args.fit, power=args.power, window=args.window,
            target_steps=args.target_step,
            time_scale=args.time_scale, backtest_tolerance=args.backtest_tolerance, plots=not args.no_plots,
            top=args.top, **common,
        )
        ev = report["explained_variance"]
        line = (f"{ev.get('tensors', 0)} tensors over steps {report['fit_steps'][0]}-{report['fit_steps'][-1]}: mean "
                f"explained variance {ev.get('mean', float('nan')):.3f}, mean R² "
                f"{report['r_squared'].get('mean', float('nan')):.3f}")
        if report["out_of_window"]:
            distances = report["out_of_window"]["relative_distance"]
            line += f"; held-out step {report['heldout_steps'][-1]}: relative distance {distances[-1]:.3f}"
        print(line)
        for line in _snapshot_lines(report["diagnostic"], report["fit_steps"], report["settings"]["base_step"]):
            print(line)
        print(f"report written to {args.output}")


def _return_large_buffers_to_the_os() -> None:
    """Keep the peak RSS at the ``--max-memory`` budget (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after each large free, so later transient buffers of a few MB come
    from the heap, which fragments and holds ~300 MB more over a run; a fixed threshold hands them back
    on free. Done here, not in the library, because it changes the process's allocator.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``relex`` command line; returns the exit status (0 ok, 2 bad input, 1 failure, 130 interrupted)."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:  # reported by the command's own parser, with its usage
            _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    _configure_logging(args.verbose, args.quiet)
    _return_large_buffers_to_the_os()
    from ..checkpoints import RelexInputError

    try:
        with _tqdm_logging():
            _run(args)
    except (RelexInputError, FileExistsError) as err:
        print(f"relex {args.command}: error: {_cli_wording(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"relex {args.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"relex {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _tqdm_logging():  # type: ignore[no-untyped-def]
    """Route log lines around the progress bar."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.getLogger("relex_callback")]):
        yield


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
