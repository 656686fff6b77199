"""
The configuration of a script: upstream's defaults-dict -> argparse flow (``str2bool``,
``add_dict_to_argparser``, ``args_to_dict``, re-exported by ``script_util`` under upstream's
names), ``--config FILE.yaml`` (with ``base:`` files), ``--flavor`` (which upstream codebase's
defaults), one-line argparse errors that suggest the closest flag, and ``run_script``, every
script's ``__main__``: it catches ``errors.ProjectError`` (each error says its exit status) plus
the standard errors a script names.

It sits below ``script_util`` (which builds models) and imports nothing that builds or trains.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from . import dist_util
from .errors import ProjectError

__all__ = [
    "str2bool",
    "add_dict_to_argparser",
    "expand_bare_bool_flags",
    "args_to_dict",
    "FLAVORS",
    "DEFAULT_FLAVOR",
    "MODEL_KEYS",
    "check_flavor",
    "apply_flavor",
    "CONFIG_BASE_KEY",
    "load_config",
    "coerce_config",
    "parse_args_with_config",
    "suggest_flags",
    "is_number",
    "FlagSuggestingParser",
    "with_flag_suggestions",
    "run_script",
]


# --------------------------------------------------------------------------------------
# argparse and configuration files
# --------------------------------------------------------------------------------------


def str2bool(v) -> bool:
    """Parse a boolean flag value (https://stackoverflow.com/questions/15008758 style)."""
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("yes", "true", "t", "y", "1"):
        return True
    if str(v).lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def _flag_type(default):
    if default is None:
        return str
    if isinstance(default, bool):
        return str2bool
    return type(default)


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict[str, Any]) -> None:
    """
    Add one ``--key`` flag per entry, typed like its default (bools via ``str2bool``).

    A boolean flag also takes the bare form: ``--flag`` alone means True (``nargs="?"``,
    ``const=True``); ``--flag True`` / ``--flag False`` work as upstream's. A bare flag before a
    positional argument (``--flag RUN_DIR``) does not swallow it when the parser is a
    ``FlagSuggestingParser`` (``parse_args_with_config``, every script under ``run_script``):
    see ``expand_bare_bool_flags``.
    """
    for k, v in default_dict.items():
        if isinstance(v, bool):
            parser.add_argument(f"--{k}", default=v, type=str2bool, nargs="?", const=True)
        else:
            parser.add_argument(f"--{k}", default=v, type=_flag_type(v))


_BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")


def _is_bare_bool_action(action: argparse.Action) -> bool:
    return action.nargs == "?" and action.const is True and action.type is str2bool


def expand_bare_bool_flags(parser: argparse.ArgumentParser, args: Sequence[str]) -> list:
    """
    ``args`` with an explicit ``True`` after each bare boolean flag (``nargs="?"``, ``const=True``,
    ``type=str2bool``) that is followed by a word that is not a boolean value: argparse would
    otherwise give that word (a positional argument such as a run folder) to the flag and fail.
    ``--flag``, ``--flag False``, ``--flag=yes`` and ``--flag --other`` are left as they are;
    nothing after ``--`` is touched.
    """
    args = list(args)
    actions = parser._option_string_actions  # noqa: SLF001 - argparse keeps its option table here
    longs = [o for o in actions if o.startswith("--")]
    out = []
    for i, tok in enumerate(args):
        out.append(tok)
        if tok == "--":
            return out + args[i + 1:]
        if not isinstance(tok, str) or not tok.startswith("-") or "=" in tok:
            continue
        action = actions.get(tok)
        if action is None and tok.startswith("--") and getattr(parser, "allow_abbrev", True):
            hits = {actions[o] for o in longs if o.startswith(tok)}
            action = hits.pop() if len(hits) == 1 else None
        if action is None or not _is_bare_bool_action(action):
            continue
        nxt = args[i + 1] if i + 1 < len(args) else None
        if isinstance(nxt, str) and not nxt.startswith("-") and nxt.lower() not in _BOOL_WORDS:
            out.append("True")
    return out


def args_to_dict(args, keys: Iterable[str]) -> Dict[str, Any]:
    """Pick ``keys`` out of an argparse namespace (or a dict) into a plain dict."""
    if isinstance(args, dict):
        return {k: args[k] for k in keys}
    return {k: getattr(args, k) for k in keys}


# --flavor: which upstream codebase's defaults a script starts from. Guided-Diffusion's are this
# module's; Improved-Diffusion's differ in these keys (its script_util and image_datasets):
# the network sees t rescaled to 0..1000, the learned-sigma VB term is rescaled, and its loader
# does not flip images. Values given by a config file or the command line still win.
FLAVORS: Dict[str, Dict[str, Any]] = {
    "guided": {},
    "improved": {"rescale_timesteps": True, "rescale_learned_sigmas": True, "sigma_small": False,
                 "random_flip": False},
}
DEFAULT_FLAVOR = "guided"
# a defaults dict with these keys builds a diffusion model, so its script takes --flavor
MODEL_KEYS = ("rescale_timesteps", "rescale_learned_sigmas")


def check_flavor(flavor: Any, source: str = "--flavor") -> str:
    """Validate a flavour name; the message names ``source`` and the choices."""
    name = str(flavor).strip().lower()
    if name not in FLAVORS:
        raise ValueError(f"{source}: expected one of {', '.join(FLAVORS)}, got {flavor!r}")
    return name


def apply_flavor(defaults: Dict[str, Any], flavor: str) -> Dict[str, Any]:
    """
    ``defaults`` with the upstream codebase's own defaults for the keys it has.

    :param flavor: "guided" (unchanged) or "improved" (Improved-Diffusion's defaults).
    """
    out = dict(defaults)
    out.update({k: v for k, v in FLAVORS[check_flavor(flavor)].items() if k in out})
    if "flavor" in out:
        out["flavor"] = check_flavor(flavor)
    return out


def _preparse_flavor(argv: Sequence[str], config_values: Dict[str, Any]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--flavor", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.flavor is not None:
        return check_flavor(known.flavor)
    if "flavor" in config_values:
        return check_flavor(config_values["flavor"], "--config: flavor")
    return DEFAULT_FLAVOR


CONFIG_BASE_KEY = "base"


def load_config(path, _seen: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    """
    Read a YAML (or JSON) configuration file into a flat dict of flag values.

    A file may extend another with ``base: other.yaml`` (a path relative to the file): the base's
    values are read first (recursively) and the file's own keys override them, so a method's
    config states only the method's keys.

    :param path: the ``--config`` file.
    :raises FileNotFoundError / ValueError: naming the file and what was wrong.
    """
    import yaml  # PyYAML: only configuration files need it

    path = Path(path)
    if not path.is_file():
        where = f" (the {CONFIG_BASE_KEY}: of {_seen[-1]})" if _seen else ""
        raise FileNotFoundError(f"--config: file not found: {path}{where}")
    seen = (_seen or ()) + (str(path.resolve()),)
    if len(set(seen)) < len(seen):
        raise ValueError(f"--config {path}: '{CONFIG_BASE_KEY}:' files form a cycle: {' -> '.join(seen)}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag: value, got {type(data).__name__}")
    base = data.pop(CONFIG_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"--config {path}: '{CONFIG_BASE_KEY}:' must be a file name, got {base!r}")
    merged = load_config(path.parent / base, seen)
    merged.update(data)
    return merged


def coerce_config(values: Dict[str, Any], defaults: Dict[str, Any], source: str) -> Dict[str, Any]:
    """
    Check a config's keys against ``defaults`` and convert each value to its flag's type.

    :param source: what to name in error messages (e.g. the config file).
    :raises ValueError: for unknown keys (listing the valid ones) or values of the wrong type.
    """
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(defaults))}"
        )
    out = {}
    for k, v in values.items():
        d = defaults[k]
        try:
            if v is None or d is None:
                out[k] = v
            elif isinstance(d, bool):
                out[k] = str2bool(v)
            elif isinstance(d, str):
                out[k] = "" if v is None else (",".join(str(x) for x in v) if isinstance(v, list) else str(v))
            elif isinstance(d, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
            elif isinstance(d, int) and isinstance(v, float) and v.is_integer():
                out[k] = int(v)
            else:
                out[k] = type(d)(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(
                f"{source}: key {k!r} expects a {type(d).__name__} (default {d!r}), got {v!r}"
            ) from None
    return out


def parse_args_with_config(
    defaults: Dict[str, Any],
    argv: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
    parser: Optional[argparse.ArgumentParser] = None,
) -> argparse.Namespace:
    """
    Upstream's defaults-dict -> argparse flow, plus ``--config FILE.yaml``.

    Precedence: command-line flags > config file > ``defaults``. The namespace gets
    ``args.config`` (the file, or "").

    :param defaults: flag name -> default value (its type types the flag).
    :param argv: arguments to parse (``sys.argv[1:]`` when None).
    :param parser: an existing parser to extend (for scripts with positional arguments).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    config_values = load_config(known.config) if known.config else {}
    if any(k in defaults for k in MODEL_KEYS):
        # --flavor selects the upstream codebase's defaults; the config and the command line win over them
        defaults = apply_flavor(dict({"flavor": DEFAULT_FLAVOR}, **defaults),
                                _preparse_flavor(sys.argv[1:] if argv is None else argv, config_values))
    parser = with_flag_suggestions(parser or argparse.ArgumentParser(description=description))
    parser.add_argument("--config", default="", help="YAML file of flag values; command-line flags override it")
    add_dict_to_argparser(parser, defaults)
    if known.config:
        parser.set_defaults(**coerce_config(config_values, defaults, f"--config {known.config}"))
    args = parser.parse_args(argv)
    if "flavor" in defaults:
        args.flavor = check_flavor(args.flavor)
    # which flags the command line itself gave (a config file's values are defaults here)
    given = sys.argv[1:] if argv is None else list(argv)
    args.command_line_flags = sorted({a[2:].split("=", 1)[0] for a in given if a.startswith("--")} & set(defaults))
    return args


# --------------------------------------------------------------------------------------
# short argparse errors: an unknown flag names the closest valid ones
# --------------------------------------------------------------------------------------

_ARGPARSE_PARSE_ARGS = argparse.ArgumentParser.parse_args
_ARGPARSE_PARSE_KNOWN_ARGS = argparse.ArgumentParser.parse_known_args
_ARGPARSE_ERROR = argparse.ArgumentParser.error


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def suggest_flags(flag: str, valid: Iterable[str], n: int = 3) -> list:
    """
    The valid flags closest to an unknown one: near spellings (difflib), the initials of its
    words (``--learning_rate`` -> ``--lr``, first) and, for names of four letters or more, containment.

    :param flag: the unknown flag as typed (``--lerning_rate``, ``-lr``, ``--save-interval``).
    :param valid: the parser's option strings; only ``--long`` ones other than ``--help`` are offered.
    :return: at most ``n`` flags, closest first.
    """
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    names = {v[2:]: v for v in valid if v.startswith("--") and v != "--help"}
    if name in names:  # "-lr" for "--lr"
        return [names[name]]
    out = [c for c in sorted(names)
           if ("_" in name and _initials(name) == c) or ("_" in c and _initials(c) == name)]
    out += difflib.get_close_matches(name, list(names), n=n, cutoff=0.7)
    if len(name) >= 4:
        out += [c for c in sorted(names, key=len) if len(c) >= 4 and (name in c or c in name)]
    return [names[c] for c in dict.fromkeys(out)][:n]


def _help_hint(parser: argparse.ArgumentParser) -> str:
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if parser.prog == "__main__.py":  # python -m something
        return "--help lists all"
    if script.endswith(".py") and Path(script).name == parser.prog:
        rel = os.path.relpath(script) if os.path.isabs(script) else script
        return f"python {script if rel.startswith('..') else rel} --help lists all"
    return f"{parser.prog} --help lists all"


def _short_error(parser: argparse.ArgumentParser, message: str) -> None:
    if not getattr(parser, "exit_on_error", True):
        _ARGPARSE_ERROR(parser, message)
    parser.exit(2, f"{parser.prog}: error: {message} ({_help_hint(parser)})\n")


def _unknown_flags_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    flags = [a for a in extras if a.startswith("-") and a not in ("-", "--") and not is_number(a)]
    if not flags:
        return f"unrecognized arguments: {' '.join(extras)}"
    valid = list(parser._option_string_actions)
    named = []
    for a in flags:
        name = a.split("=", 1)[0]
        close = suggest_flags(name, valid)
        named.append((name, f"did you mean {' or '.join(close)}?" if close else ""))
    if len(named) == 1:
        name, hint = named[0]
        return f"{name}: unknown flag" + (f"; {hint}" if hint else "")
    return "unknown flags " + ", ".join(f"{name} ({hint})" if hint else name for name, hint in named)


def is_number(text: str) -> bool:
    """True when ``text`` parses as a float (``"1e-4"``, ``"-3"``, ``"nan"``)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_known_args_expanding(self, args=None, namespace=None):
    """``parse_known_args``, with ``expand_bare_bool_flags`` applied to ``args`` first."""
    args = sys.argv[1:] if args is None else args
    return _ARGPARSE_PARSE_KNOWN_ARGS(self, expand_bare_bool_flags(self, args), namespace)


def _parse_args_suggesting(self, args=None, namespace=None):
    if not getattr(self, "exit_on_error", True):
        return _ARGPARSE_PARSE_ARGS(self, args, namespace)
    namespace, extras = self.parse_known_args(args, namespace)
    if extras:
        _short_error(self, _unknown_flags_message(self, extras))
    return namespace


class FlagSuggestingParser(argparse.ArgumentParser):
    """
    An ``ArgumentParser`` whose errors are one line, without the usage: an unknown flag is named
    with the closest valid flags (``--lerning_rate: unknown flag; did you mean --lr?``), other
    errors keep argparse's message; both point at ``--help`` and exit with status 2.
    """

    parse_args = _parse_args_suggesting
    parse_known_args = _parse_known_args_expanding

    def error(self, message):
        _short_error(self, message)


def with_flag_suggestions(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``, made a FlagSuggestingParser when it is a plain ArgumentParser (a subclass is left as it is)."""
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = FlagSuggestingParser
    return parser


def _suggesting_error(self, message):
    _short_error(self, message)


class _FlagSuggestions:
    """While active, every ArgumentParser behaves like a FlagSuggestingParser (see ``run_script``)."""

    def __enter__(self):
        self.saved = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error,
                      argparse.ArgumentParser.parse_known_args)
        argparse.ArgumentParser.parse_args = _parse_args_suggesting
        argparse.ArgumentParser.error = _suggesting_error
        argparse.ArgumentParser.parse_known_args = _parse_known_args_expanding
        return self

    def __exit__(self, *exc):
        (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error,
         argparse.ArgumentParser.parse_known_args) = self.saved
        return False


def run_script(
    main: Callable[[], Any],
    errors: Tuple[type, ...] = (ValueError, FileNotFoundError, FileExistsError),
    failures: Tuple[type, ...] = (),
) -> None:
    """
    Run a script's ``main()`` so that a bad flag, file or value ends it with its message instead
    of a traceback. While it runs, every argparse parser reports a bad flag in one line, naming
    an unknown flag's closest valid flags (``FlagSuggestingParser``), instead of printing the usage.

    Whatever ends it (success, a message, an interruption, an unexpected error with its
    traceback, argparse's exit), the process group is destroyed afterwards on every rank
    (``dist_util.teardown_dist``: a two-process run must not abort at exit). Under a launcher with
    several processes, the messages of errors every rank raises alike (flags, files, agreed stops)
    are printed by rank 0 alone instead of once per rank, interleaved; a traceback is printed by
    every rank that hits it.

    :param main: the script's entry point.
    Every ``errors.ProjectError`` is reported by its own ``script_message`` and ``exit_status``
    (a clean stop at SIGTERM: 128 + the signal; a checkpoint that cannot be written: 1).

    :param errors: bad input: the message and exit status 2.
    :param failures: a run that went wrong (e.g. a diverged loss): the message and exit status 1.
    """
    name = os.path.basename(sys.argv[0])
    message, code, exits = None, 0, False
    # the exception is handled inside the except clauses and dropped there: its traceback holds the
    # frames of the training (the DDP wrapper and with it the process group) until then
    try:
        with _FlagSuggestions():
            main()
    except KeyboardInterrupt:
        message, code = (f"{name}: interrupted (Ctrl-C); rerun the same command to resume from the last complete "
                         "checkpoint"), 130
    except (ProjectError,) + tuple(errors) + tuple(failures) as e:
        message, code = _script_error(name, e, tuple(failures))
    except SystemExit as e:  # argparse's --help and one-line errors (already printed), an explicit sys.exit
        code, exits = e.code, True
    except BaseException:  # noqa: BLE001 - an unexpected error: its traceback, as Python prints it, then the same exit
        traceback.print_exc()
        code = 1
    if message is not None and (dist_util.launched_rank() == 0 or dist_util.launched_world_size() == 1):
        print(message, file=sys.stderr, flush=True)
    dist_util.teardown_dist()
    if code or exits:  # exits: a SystemExit goes on as it came, also with status 0 (--help)
        sys.exit(code)


def _script_error(name: str, error: BaseException, failures: Tuple[type, ...]) -> Tuple[str, int]:
    """The message and exit status of an error ``run_script`` reports (no traceback)."""
    if isinstance(error, ProjectError):
        # a script's ``failures`` may still mark a project error as a run gone wrong (status 1)
        code = 1 if failures and isinstance(error, failures) else error.exit_status
        return error.script_message(name), code
    return f"{name}: error: {error}", (1 if failures and isinstance(error, failures) else 2)
