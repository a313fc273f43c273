"""How every cxr_rf command starts and ends (the convention is in ``cxr_rf.errors``).

    if __name__ == "__main__":
        cli.run(main, _define_flags)

``run`` defines the command's absl flags, parses them, sets up the logs and calls ``main``:

- a flag that cannot be parsed or fails its check (``check_number``, ``define_config``) is
  ``error: <message>`` on stderr, exit status 2, before ``main`` runs;
- ``main`` raising ``errors.UserError`` / ``errors.RunError`` is ``error: <message>``, exit
  status 2 / 1; anything else keeps its traceback (a bug must show where it happened);
- ``--help`` exits 0 (absl's own help flags exit 1, which would read as a failure);
- the logs: Orbax and Grain log every save and restore through absl at INFO, and JAX logs
  that it could not load libtpu on every host without one; neither is for the user.

``call`` runs a command in the calling process the same way and returns its exit status
(tests: flags are defined for the call and removed after it, so commands whose flags share
names can be called one after another).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

from cxr_rf import errors, hostheap

FLAGS = flags.FLAGS
# Flags this module defines for a command (define_config) belong to that command: its --help
# lists them.
flags.disclaim_key_flags()
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")
_CONFIG_FLAGS: set[str] = set()   # the DEFINE_config_file flags of this process (define_config)


# ----------------------------------------------------------------------------- logs

class _NoLibtpuNotice(logging.Filter):
    """Drops JAX's 'Unable to initialize backend 'tpu': ... Failed to open libtpu.so' (INFO,
    logger ``jax._src.xla_bridge``, jax 0.10.2), logged on every host without libtpu when
    JAX_PLATFORMS is unset: it only says this is not a TPU host. Any other backend failure,
    including libtpu that is installed but cannot start, is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unable to initialize backend 'tpu'")
                    and "Failed to open libtpu.so" in message)


_LIBTPU_FILTER = _NoLibtpuNotice()


class _NoOrbaxLeftoverTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's own tasks. When a
    restore fails (a missing or corrupted array), Orbax checks every array's files in
    concurrent tasks, raises the first failure (which the command reports in one line) and
    leaves the others' exceptions unretrieved: asyncio logs each, with its traceback, when the
    task is collected (how many depends on timing). They repeat the reported error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved")
                    and "orbax" in message)


_ORBAX_TASKS_FILTER = _NoOrbaxLeftoverTasks()


def quiet_logs() -> None:
    """Keep the console for the command's own messages (idempotent)."""
    xla_bridge = logging.getLogger("jax._src.xla_bridge")
    if _LIBTPU_FILTER not in xla_bridge.filters:
        xla_bridge.addFilter(_LIBTPU_FILTER)
    aio = logging.getLogger("asyncio")
    if _ORBAX_TASKS_FILTER not in aio.filters:
        aio.addFilter(_ORBAX_TASKS_FILTER)
    # Orbax and Grain log through absl at INFO on every save/restore.
    logging.getLogger("absl").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- flags

def define_config(name: str, help_string: str) -> None:
    """An ml_collections config-file flag (``--name FILE[:ARG]`` and ``--name.a.b=v``) whose
    file is checked before it is loaded: ml_collections defers the error of a file it cannot
    open until the config is first used, or raises it mid-parse when an override needs it."""
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(name, None, help_string)
    _CONFIG_FLAGS.add(name)


def check_number(name: str, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse, when the flags are parsed, a value of the numeric flag ``--name`` that is not
    finite or lies outside [lo, hi] (``lo_open``/``hi_open`` exclude an end; None: unbounded).
    An unset flag (None) passes. absl's own bounds let nan and inf through."""
    allowed = "an integer" if FLAGS[name].flag_type() == "int" else "a finite number"
    if lo is not None and hi is not None:
        allowed += f" in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed += f" {'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        allowed += f" {'<' if hi_open else '<='} {_fmt(hi)}"

    def ok(v: Any) -> bool:
        if v is None:
            return True
        if not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    flags.register_validator(name, ok, message=f"must be {allowed}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def require(*names: str) -> None:
    """UserError naming the flags among ``names`` that were not given."""
    missing = [f"--{n}" for n in names if FLAGS[n].value in (None, "")]
    if len(missing) == 1:
        raise errors.UserError(f"{missing[0]} is required (see --help)")
    if missing:
        raise errors.UserError(f"{', '.join(missing[:-1])} and {missing[-1]} are required "
                               "(see --help)")


def no_arguments(argv: Sequence[str]) -> None:
    """UserError for words on the command line that are not flags."""
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are "
                               "--name=value; see --help)")


# ----------------------------------------------------------------------------- paths

def _is_url(path: str) -> bool:
    return "://" in str(path)


# The path checks look at local paths only: a bucket (gs://) has no directories to check, and
# the command's own first access reports a missing run there.

def output_dir(path: str, flag: str) -> None:
    """A directory to create or reuse: an existing file there is a UserError."""
    if not _is_url(path) and os.path.exists(path) and not os.path.isdir(path):
        raise errors.UserError(f"{flag} {path} exists and is not a directory")


def output_file(path: str, flag: str) -> None:
    """A file to write: a directory there, or a missing parent directory, is a UserError,
    found before the work whose result it is to hold."""
    if _is_url(path):
        return
    if os.path.isdir(path):
        raise errors.UserError(f"{flag} {path} is a directory; it names the file to write")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise errors.UserError(f"{flag} {path}: directory {parent} does not exist")


def input_dir(path: str, flag: str) -> None:
    """A directory to read: missing, or a file, is a UserError."""
    if _is_url(path):
        return
    if not os.path.exists(path):
        raise errors.UserError(f"{flag} {path} does not exist")
    if not os.path.isdir(path):
        raise errors.UserError(f"{flag} {path} is not a directory")


# ----------------------------------------------------------------------------- running

def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _fail(e: errors.UserError | errors.RunError) -> NoReturn:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(e.exit_code)


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or while handling, outermost first."""
    out = [e]
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
        out.append(nxt)
    return out


def _check_config_files(argv: Sequence[str]) -> None:
    """The file of every config-file flag on the command line exists and is a file."""
    for name in _CONFIG_FLAGS:
        for i, arg in enumerate(argv):
            key, eq, value = arg.partition("=")
            if key not in (f"--{name}", f"-{name}"):
                continue
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            path = value.split(":", 1)[0]
            if not path:
                raise errors.UserError(f"--{name} needs an experiment file (experiments/NAME.py)")
            if os.path.isdir(path):
                raise errors.UserError(f"--{name} {path} is a directory, not an experiment file")
            if not os.path.isfile(path):
                raise errors.UserError(f"--{name} {path} does not exist")


def _from_config_override(e: BaseException) -> bool:
    """Whether ``e`` was raised resolving a ``--config.a.b=v`` override (a field that does not
    exist): ml_collections raises a plain AttributeError/KeyError there."""
    return any(os.path.join("ml_collections", "config_flags", "config_path.py") in f.filename
               for f in traceback.extract_tb(e.__traceback__))


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parse ``argv`` into FLAGS (absl's ``flags_parser``); the remaining words, program first.
    Bad input exits 2 with one line."""
    try:
        _check_config_files(argv)
        return FLAGS(list(argv))
    except (errors.UserError, errors.RunError) as e:
        _fail(e)
    except SystemExit as e:
        # absl's help flags print the help and exit 1; asking for help is not a failure.
        asked = any(a.lstrip("-").partition("=")[0] in _HELP_FLAGS for a in argv[1:])
        raise SystemExit(0 if asked and e.code == 1 else e.code) from None
    except flags.Error as e:
        chain = _chain(e)
        ours = [x for x in chain if isinstance(x, (errors.UserError, errors.RunError))]
        if ours:   # an experiment's get_config refused its argument: the innermost message
            _fail(ours[-1])
        if "Error whilst parsing config file" in str(e):
            # ml_collections folds any other exception of get_config into the flag's message;
            # it is a bug in the experiment file, shown with its own traceback.
            raise chain[-1] from None
        _fail(errors.UserError(str(e)))
    except (AttributeError, KeyError) as e:
        if not _from_config_override(e):
            raise
        # The KeyError inside holds the readable text ("'x'\nDid you mean ...").
        texts = [x.args[0] for x in _chain(e)
                 if isinstance(x, KeyError) and x.args and isinstance(x.args[0], str)]
        _fail(errors.UserError("a --config.* override names no config field: "
                               + (texts[0] if texts else str(e))))


def _guarded(main: Callable[[list[str]], Any], crash_status: int | None, *,
             quiet: bool = True):
    def wrapped(argv: list[str]) -> Any:
        try:
            if quiet:   # here, not earlier: absl.app sets the absl logger's level as it starts
                quiet_logs()
            return main(argv)
        except (errors.UserError, errors.RunError) as e:
            _fail(e)
        except Exception:
            if crash_status is None:
                raise
            traceback.print_exc()
            print("error: failed unexpectedly (traceback above)", file=sys.stderr)
            sys.exit(crash_status)
    return wrapped


def run(main: Callable[[list[str]], Any], define_flags: Callable[[], None] | None = None, *,
        crash_status: int | None = None, host_heap: bool = False) -> None:
    """The ``__main__`` of a command: define its flags, parse them, run ``main(argv)``.

    ``crash_status``: the exit status of an unexpected exception, whose traceback is printed
    either way; None lets Python exit 1. For a command whose own answer is exit status 1
    (aot: "does not fit"), so that a crash cannot read as that answer.

    ``host_heap``: the command runs a long steady-state loop of compiled steps (train, bench),
    so where JAX computes on the CPU it keeps freed memory for the next step
    (``cxr_rf.hostheap``). Other commands keep glibc's defaults: one malloc arena slows XLA's
    multi-threaded compiler by 10–20%, and compiling is most of a short command.
    """
    quiet_logs()
    if host_heap:
        try:
            # Before anything starts JAX: the heap setting must precede XLA's threads.
            hostheap.configure()
        except errors.UserError as e:
            _fail(e)
    if define_flags is not None:
        define_flags()
    app.run(_guarded(main, crash_status), flags_parser=parse_flags)


def call(module: Any, argv: Sequence[str]) -> int:
    """Run the command ``module`` (its ``_define_flags`` and ``main``) in this process, as
    ``python -m`` would, and return its exit status. Unexpected exceptions propagate."""
    before = set(FLAGS)
    module._define_flags()
    added = [n for n in FLAGS if n not in before]
    try:
        try:
            rest = parse_flags([module.__name__, *map(str, argv)])
            code = _guarded(module.main, None, quiet=False)(rest)   # the caller's logging
        except SystemExit as e:
            code = e.code
        return 0 if code is None else int(code)
    finally:
        for name in added:
            if name in FLAGS:
                delattr(FLAGS, name)
        _CONFIG_FLAGS.difference_update(added)
