"""How ``metakd`` reports a mistake: one line, exit status 2, the traceback only on request.

A library ``ValueError`` (a bad setting, a missing or foreign checkpoint), a config typo or a
missing file prints ``metakd <command>: error: <message>`` (with "did you mean ...?" for a
misspelt key) and exits with status 2 (:func:`fail`, :func:`explain_config_error`).
``--traceback`` (or ``METAKD_TRACEBACK=1``) shows the full Python traceback instead; anything
unexpected (a bug) always does. Like :mod:`lightning_metakd.command_line`, this module imports
nothing of ours, torch or Lightning, so that an error in parsing costs no import.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

#: The environment variable that asks for full tracebacks (``metakd --traceback`` sets it).
TRACEBACK_ENV = "METAKD_TRACEBACK"
#: The exception types of expected mistakes, when our own code raised them (:func:`expected_error`).
EXPECTED = (ValueError, TypeError, LookupError, OSError)
_PACKAGE = str(Path(__file__).resolve().parent)


class UsageError(SystemExit):
    """A mistake on the command line or in a config: one message, exit status 2.

    A ``SystemExit`` so that it leaves argument parsing the way argparse's own errors do (code that
    catches those, e.g. LightningCLI's, sees the same type); :func:`lightning_metakd.cli.main`
    prints :attr:`message` as ``metakd <command>: error: <message>``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def show_traceback() -> bool:
    """Whether the user asked for full tracebacks (``--traceback`` or ``METAKD_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by lightning-metakd's own code (its innermost frame is ours)."""
    tb = err.__traceback__
    if tb is None:
        return True  # constructed and raised by the caller without a traceback: a message of ours
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def expected_error(err: BaseException) -> BaseException | None:
    """The exception whose message tells the user what to fix, or ``None`` for a bug.

    jsonargparse and Lightning wrap errors raised while they build the model or the data (the
    library's "ways must be at least 2, got 1." arrives as the cause of a "Does not validate
    against any of the Union subtypes" ``ValueError`` with a namespace dump), so this follows the
    ``__cause__`` chain to its end. That innermost error is expected when it is a missing file,
    or one of :data:`EXPECTED` raised by our own code, whose messages are written for users.

    Example:
        >>> expected_error(ValueError("ways must be at least 2, got 1."))
        ValueError('ways must be at least 2, got 1.')
        >>> try:
        ...     {}["x"]
        ... except KeyError as err:
        ...     print(expected_error(err))
        None
    """
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, UsageError | FileNotFoundError):
        return root
    if isinstance(root, EXPECTED) and _raised_here(root):
        return root
    return None


def message_of(err: BaseException) -> str:
    """The user-facing text of an exception (a ``KeyError``'s without its repr quotes)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename!r}"
    return str(err) or type(err).__name__


def fail(prog: str, err: BaseException, catch_all: bool = False) -> int:
    """Print ``<prog>: error: <message>`` and return the exit status 2.

    Call it from an ``except`` block. The message is that of :func:`expected_error` (the innermost
    cause of a wrapped library error), else ``err``'s own. It re-raises ``err``, so that its
    traceback is shown, with ``--traceback``/``METAKD_TRACEBACK=1``, and with ``catch_all`` (an
    ``except Exception``) when ``err`` is not an expected mistake: a bug keeps its traceback.
    """
    cause = expected_error(err)
    if show_traceback() or (catch_all and cause is None):
        raise err
    print(f"{prog}: error: {message_of(cause or err)}", file=sys.stderr, flush=True)
    return 2


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'shots'?"`` for the closest of ``candidates`` (difflib), else ``""``.

    Example:
        >>> did_you_mean("shot", ["ways", "shots", "queries"])
        "; did you mean 'shots'?"
        >>> did_you_mean("xyz", ["ways", "shots"])
        ''
    """
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def _init_arguments(class_path: str) -> list[str]:
    """The ``init_args`` a class accepts: its ``__init__`` parameters, and its bases' for ``**kwargs``."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        init = klass.__init__ if inspect.isclass(cls) else klass
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return [n for n in dict.fromkeys(names) if n != "self"]


def _module_names(module: str) -> list[str]:
    try:
        found = importlib.import_module(module)
    except ImportError:
        return []
    return list(getattr(found, "__all__", None) or [n for n in dir(found) if not n.startswith("_")])


_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value"
    r"( type)?:|- Expected a <class 'NoneType'>|tip: )"
)
_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*$")
_OPTION = re.compile(r"^(?:- )?Option '([^']+)' is not accepted$")
_SUBCOMMAND_OPTION = re.compile(r"^Subcommand '([^']+)' does not accept option '([^']+)'$")
_NO_ATTRIBUTE = re.compile(r"^module '([\w.]+)' has no attribute '(\w+)'$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")


def explain_config_error(message: str, keys: Sequence[str] = ()) -> str:
    """jsonargparse's nested, multi-line parse error as one line, with "did you mean" for a typo.

    The message names the config key and what is wrong with it: an unknown key of a class (with
    the closest argument that class takes), an unknown option (with the closest of ``keys``, the
    parser's option names), a class path that names nothing (with the closest name in its
    module), or the innermost message with the key it belongs to.

    Example:
        >>> explain_config_error(
        ...     'Parser key "data":\\n  Does not validate against any of the Union subtypes\\n'
        ...     "  Errors:\\n    - Problem with given class_path 'argparse.ArgumentParser':\\n"
        ...     "        Option 'prgo' is not accepted\\n    - Expected a <class 'NoneType'>"
        ... )
        "data.init_args.prgo: argparse.ArgumentParser takes no argument 'prgo'; did you mean 'prog'?"
        >>> explain_config_error(
        ...     "Subcommand 'fit' does not accept option 'trainer.max_epoch'", ["trainer.max_epochs"]
        ... )
        "unknown option 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"
        >>> explain_config_error("unrecognized arguments: --trainer.max_epohcs 2", ["trainer.max_epochs"])
        "unrecognized argument '--trainer.max_epohcs'; did you mean '--trainer.max_epochs'?"
    """
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value)
    leaves: list[tuple[list[tuple[int, str, str]], str]] = []
    for raw in message.splitlines():
        text = raw.strip()
        if not text or _NOISE.match(text):
            continue
        indent = len(raw) - len(raw.lstrip()) + (2 if text.startswith("- ") else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := _KEY.match(text):
            stack.append((indent, "key", match[1]))
            if match[2]:
                leaves.append((list(stack), match[2]))
        elif match := _CLASS.match(text):
            stack.append((indent, "class", match[1]))
        else:
            leaves.append((list(stack), text.removeprefix("- ")))
    if not leaves:
        return " ".join(message.split())
    # The most specific complaint: an unknown option or attribute, else the deepest message.
    context, text = max(
        leaves,
        key=lambda leaf: (
            bool(_OPTION.match(leaf[1]) or _NO_ATTRIBUTE.match(leaf[1])),
            len(leaf[0]),
        ),
    )
    path = ".".join("init_args" if kind == "class" else value for _, kind, value in context)
    owner = next((value for _, kind, value in reversed(context) if kind == "class"), None)
    if (match := _OPTION.match(text)) and owner is not None:
        key = f"{path}.{match[1]}" if path else match[1]
        hint = did_you_mean(match[1], _init_arguments(owner))
        return f"{key}: {owner} takes no argument {match[1]!r}{hint}"
    if match := _SUBCOMMAND_OPTION.match(text):
        return f"unknown option {match[2]!r}{did_you_mean(match[2], keys)}"
    if match := _OPTION.match(text):
        return f"unknown option {match[1]!r}{did_you_mean(match[1], keys)}"
    if (match := _UNRECOGNIZED.match(text)) and match[1].startswith("--"):
        flag = match[1].split()[0].split("=")[0]
        flags = [f"--{key}" for key in keys]
        return f"unrecognized argument {flag!r}{did_you_mean(flag, flags)}"
    if match := _NO_ATTRIBUTE.match(text):
        text += did_you_mean(match[2], _module_names(match[1]), cutoff=0.8)  # names are long
    return f"{path}: {text}" if path else text
