"""The bnlab command: argument parsing, progress and exit codes only.

    bnlab train --workdir runs/digits --config digits --set lr=0.3 --steps 800
    bnlab reproduce --quick

Results go to stdout, progress and messages to stderr. ``bnlab reproduce``
is a plugin (the ``bnlab.commands`` entry point that the ``experiments``
package registers): this package never imports the experiments by name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["EXIT_CODES", "main"]

EXIT_CODES = {
    0: "success",
    1: "unexpected error (a bug: please report it with the traceback)",
    2: "usage or configuration error (nothing was run)",
    3: "the loss became NaN/Inf in every arm (the step is named; no bad "
    "checkpoint written)",
    4: "run directory unusable: in use by another run, not a directory, not "
    "readable, replaced while running, or holding checkpoints of another "
    "model/config (nothing was moved)",
    5: "dataset missing or corrupt",
    6: "disk full or not writable while running (earlier checkpoints kept)",
    7: "reproduce finished and at least one claim is CONTRADICTED (see the "
    "report; SUPPORTED, INCONCLUSIVE and NOT TESTABLE exit 0, as does any "
    "--smoke run, which judges nothing)",
    130: "interrupted (Ctrl-C); run the same command again to resume",
    143: "terminated (SIGTERM, e.g. a scheduler's preemption); run the same "
    "command again to resume",
}

_EPILOG_CODES = "exit codes:\n" + "\n".join(
    f"  {code:>3}  {what}" for code, what in EXIT_CODES.items()
)


class _Streams:
    """Where bnlab's own messages and progress go (the terminal's stderr,
    kept apart from the libraries' output while a command runs); results go
    to stdout, so that ``> log`` keeps them."""

    terminal = sys.stderr


def _terminal():
    return _Streams.terminal


def _results():
    return sys.stdout


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same
    cleanup runs (the checkpoint in flight is finished, files closed)."""


def _plain(text: str) -> str:
    """Docstring text for a terminal: no Sphinx roles or double backticks."""
    text = re.sub(r":(?:func|class|meth|attr|mod|data):`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _config_help() -> str:
    """Every config key with its type, default and meaning (from the
    docstring of bnlab.train.Config)."""
    from bnlab.train.config import PRESETS, Config

    doc = Config.__doc__ or ""
    meaning = dict(re.findall(r"^\s{6}(\w+): (.+(?:\n\s{8}.+)*)", doc, re.M))
    lines = ["config keys (--set KEY=VALUE):"]
    for f in dataclasses.fields(Config):
        text = _plain(" ".join(meaning.get(f.name, "").split()))
        lines.append(f"  {f.name} ({f.type}, default {f.default!r}): {text}")
    lines.append("presets (--config NAME): " + ", ".join(sorted(PRESETS)))
    return "\n".join(lines)


def _fail(code: int, command: str, message: str) -> int:
    print(f"bnlab {command}: {message}", file=_terminal(), flush=True)
    return code


class _Outcome:
    failed = False


@contextlib.contextmanager
def _library_output_to_log(command: str, verbose: bool):
    """Sends everything the libraries write to stderr (orbax/absl logs, their
    background threads' tracebacks after a full disk or an interrupted save,
    C++ logs) to a temporary log, at the file-descriptor level, while bnlab's
    own lines and progress go to the terminal. Python warnings (a checkpoint
    set aside, an arm that stopped) stay visible, one line each. On success
    the log is deleted; on failure its path is printed and stderr stays
    redirected until the process exits, so that late library output cannot
    reach the terminal."""
    outcome = _Outcome()
    if verbose:
        yield outcome
        return
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below)
        "w", prefix=f"bnlab-{command}-", suffix=".log", delete=False
    )
    sys.stderr.flush()
    saved_fd = os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    absl = logging.getLogger("absl")
    handler = logging.StreamHandler(log)
    saved = (
        _Streams.terminal,
        sys.stderr,
        absl.propagate,
        warnings.showwarning,
        threading.excepthook,
    )

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"bnlab {command}: warning: {message}", file=terminal, flush=True)
        print(f"{category.__name__}: {message}", file=log, flush=True)

    def thread_exception(args):  # orbax's writer threads after an interrupt
        name = args.exc_type.__name__
        print(f"thread {args.thread}: {name}: {args.exc_value}", file=log, flush=True)

    os.dup2(log.fileno(), 2)
    _Streams.terminal = terminal
    sys.stderr = log
    absl.addHandler(handler)
    absl.propagate = False
    warnings.showwarning = show
    threading.excepthook = thread_exception
    try:
        yield outcome
    except BaseException:
        outcome.failed = True
        raise
    finally:
        log.flush()
        if outcome.failed:
            print(f"  (library log: {log.name})", file=terminal, flush=True)
        else:
            os.dup2(saved_fd, 2)
            (_Streams.terminal, sys.stderr, absl.propagate) = saved[:3]
            warnings.showwarning, threading.excepthook = saved[3:]
            absl.removeHandler(handler)
            log.close()
            terminal.close()
            with contextlib.suppress(OSError):
                os.unlink(log.name)
        os.close(saved_fd)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` in the main thread (like Ctrl-C)."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded(command: str, run) -> int:
    """Runs ``run()``; maps every expected failure to one line and its code."""
    with _sigterm_as_interrupt():
        return _mapped(command, run)


def _mapped(command: str, run) -> int:
    from bnlab.data import DatasetError
    from bnlab.train import CheckpointMismatchError, ConfigError, NonFiniteError
    from bnlab.train.rundir import RunDirError, WriteError

    try:
        run()
    except ConfigError as e:
        return _fail(2, command, f"config error: {e}")
    except NonFiniteError as e:
        return _fail(3, command, str(e))
    except WriteError as e:
        return _fail(6, command, str(e))
    except (RunDirError, CheckpointMismatchError) as e:
        return _fail(4, command, str(e))
    except DatasetError as e:
        return _fail(5, command, str(e))
    except Terminated:
        return _fail(
            143,
            command,
            "terminated (SIGTERM); the last checkpoint is complete: run the same "
            "command again to resume.",
        )
    except KeyboardInterrupt:
        return _fail(
            130,
            command,
            "interrupted; run the same command again to resume from the last "
            "checkpoint.",
        )
    return 0


# ------------------------------------------------------------------ train


def _train(args: argparse.Namespace) -> int:
    from bnlab.train.config import PRESETS, ConfigError, load_config

    if args.list_presets:
        for name in sorted(PRESETS):
            print(f"{name}: {json.dumps(PRESETS[name]) if PRESETS[name] else '{}'}")
        return 0
    overrides = list(args.set or [])
    for key in ("steps", "seed", "checkpoint_every", "eval_every"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        return _fail(2, "train", f"config error: {e}")
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    if args.workdir is None:
        return _fail(2, "train", "--workdir is required to train.")
    if not args.workdir.strip():
        return _fail(
            2, "train", "--workdir is empty; give a directory, e.g. runs/digits."
        )

    import jax

    from bnlab.train import fit_config
    from bnlab.train.checkpoint import finalized_steps
    from bnlab.train.presets import layout_of

    try:  # everything about the config, before any file is touched
        config.check_devices(jax.device_count(), jax.process_count())
        layout_of(config)
    except ConfigError as e:
        return _fail(2, "train", f"config error: {e}")
    workdir = Path(args.workdir)
    try:
        resuming = bool(finalized_steps(workdir / "checkpoints"))
    except OSError:
        resuming = False  # fit reports what is wrong with the directory
    print(
        f"{'resuming' if resuming else 'starting'} run in {workdir} "
        f"({config.model} on {config.dataset}, {config.steps} steps, "
        f"parallel={config.parallel})",
        file=_terminal(),
    )
    from bnlab.train.progress import Progress

    progress = None if args.quiet else Progress(_terminal())
    try:
        code = _guarded(
            "train", lambda: fit_config(config, workdir, on_progress=progress)
        )
    finally:
        if progress is not None:
            progress.close()
    if code:
        return code
    from bnlab.train.rundir import METRICS_FILE, read_records

    records = read_records(workdir / METRICS_FILE)
    if records:
        last = records[-1]
        summary = ", ".join(
            f"{k} {v:.4f}"
            for k, v in last.items()
            if k.startswith(("val_", "test")) and isinstance(v, float)
        )
        print(f"final (step {last['step']}): {summary}", file=_results())
    print(
        f"results: {workdir / METRICS_FILE}, checkpoints: {workdir / 'checkpoints'}",
        file=_results(),
    )
    return 0


# -------------------------------------------------------------- reproduce


def _plugin(name: str):
    """The ``bnlab.commands`` entry point ``name`` (the experiments package
    registers ``reproduce``), or None."""
    for ep in importlib.metadata.entry_points(group="bnlab.commands"):
        if ep.name == name:
            return ep
    return None


def _reproduce(args: argparse.Namespace) -> int:
    ep = _plugin("reproduce")
    hint = (
        "bnlab reproduce runs the experiments of a source checkout: git clone the "
        "repository, then in it run: pip install -e '.[experiments]' and "
        "python -m bnlab reproduce."
    )
    if ep is None:
        return _fail(2, "reproduce", f"no experiments are installed. {hint}")
    try:
        plugin = ep.load()
    except ModuleNotFoundError as e:
        return _fail(
            2, "reproduce", f"the experiments cannot be imported ({e}). {hint}"
        )
    missing = plugin.missing_requirements()
    if missing:
        return _fail(
            2,
            "reproduce",
            f"{', '.join(missing)} not installed; install it with: pip install "
            f"{' '.join(missing)} (or pip install -e '.[experiments]').",
        )
    try:
        options = plugin.options(
            out=args.out,
            quick=args.quick,
            only=args.only,
            seeds=args.seeds,
            first_seed=args.first_seed,
            smoke=args.smoke,
            register=args.register,
            registry=args.registry,
            pilots=args.pilots.split(",") if args.pilots else None,
        )
    except ValueError as e:
        return _fail(2, "reproduce", str(e))
    from bnlab.train.progress import Progress

    progress = (
        None
        if args.quiet
        else Progress(_terminal(), label="", total_experiments=len(options.names))
    )

    def show(line: str) -> None:
        print(line, file=_results(), flush=True)

    verdicts: list[dict] = []
    try:
        code = _guarded(
            "reproduce",
            lambda: verdicts.extend(plugin.run(options, progress=progress, show=show)),
        )
        # a smoke run (a few steps) checks that experiments run, not claims
        contradicted = any(v.get("verdict") == "CONTRADICTED" for v in verdicts)
        if code == 0 and contradicted and not args.smoke:
            return 7
        return code
    finally:
        if progress is not None:
            progress.close()


# ----------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    from bnlab import __version__

    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Exact Batch Normalization for JAX/Flax: train runs and "
        "reproduce the BN lecture's claims.",
        epilog=_EPILOG_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser(
        "train",
        help="train (or resume) a run",
        description="Train a model, or resume the run in --workdir bit-exactly.",
        epilog=_config_help() + "\n\n" + _EPILOG_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--workdir", help="run directory (created; resumes if it has checkpoints)"
    )
    t.add_argument(
        "--config",
        default=None,
        help="preset name (see --list-presets) or JSON file; default: digits defaults",
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key (repeatable; keys listed below)",
    )
    t.add_argument("--steps", type=int, help="total training steps")
    t.add_argument("--seed", type=int, help="PRNG seed (init and shuffling)")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        dest="checkpoint_every",
        help="save a checkpoint every N steps (and at the end)",
    )
    t.add_argument(
        "--eval-every",
        type=int,
        dest="eval_every",
        help="evaluate and write a metrics record every N steps (and at the end)",
    )
    _output_options(t)
    t.add_argument(
        "--list-presets", action="store_true", help="print the presets and exit"
    )
    t.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as JSON and exit",
    )
    t.add_argument(
        "--distributed",
        metavar="ADDR,NUM,ID",
        help="call jax.distributed.initialize(ADDR, NUM, ID) first (several "
        "hosts; CPU collectives via gloo)",
    )
    r = sub.add_parser(
        "reproduce",
        help="run the experiments that test the BN lecture's claims",
        description="Run every experiment, judge each claim with its "
        "pre-registered criteria, write REPORT.md / REPORT.html. Re-running "
        "resumes. Verdicts go to stdout, progress to stderr.",
        epilog=_EPILOG_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "--quick",
        action="store_true",
        help="small scale on data shipped with bnlab (minutes on a laptop CPU)",
    )
    r.add_argument("--only", default=None, help="comma-separated experiment names")
    r.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per arm (default: the registered seeds; with --register, "
        "each experiment's power plan)",
    )
    r.add_argument(
        "--first-seed",
        type=int,
        default=None,
        dest="first_seed",
        help="first seed (default: the registered seeds, else 3000 quick / 4000 "
        "full; seeds 0-2999 are pilot seeds: exploratory only)",
    )
    r.add_argument(
        "--out",
        default=None,
        help="output directory (default runs/reproduce-quick or runs/reproduce)",
    )
    r.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps of each experiment, to check that all run (CI)",
    )
    r.add_argument(
        "--register",
        action="store_true",
        help="register the designs of these experiments and seeds (a design digest "
        "per experiment) and run nothing: a later run on them is confirmatory",
    )
    r.add_argument(
        "--registry",
        default=None,
        help="the registry file (default experiments/registry.json; a run counts "
        "only the registrations committed at HEAD)",
    )
    r.add_argument(
        "--pilots",
        default=None,
        help="with --register: comma-separated pilot run directories the power "
        "plans read (default experiments/results/pilots/, full runs first)",
    )
    _output_options(r)
    return parser


def _output_options(command: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--verbose``, the same for every command."""
    command.add_argument("--quiet", action="store_true", help="no progress output")
    command.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own logs (orbax, absl) on the terminal",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "distributed", None):
        import jax

        try:
            addr, num, pid = args.distributed.split(",")
            num, pid = int(num), int(pid)
        except ValueError:
            return _fail(2, args.command, "--distributed must be ADDR:PORT,NUM,ID.")
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(addr, num_processes=num, process_id=pid)
    command = _train if args.command == "train" else _reproduce
    with _library_output_to_log(args.command, args.verbose) as outcome:
        try:
            code = command(args)
        except Exception:  # a bug: the traceback goes to the terminal
            import traceback

            traceback.print_exc(file=_terminal())
            code = 1
        outcome.failed = code != 0
    return code


if __name__ == "__main__":
    sys.exit(main())
