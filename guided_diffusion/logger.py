"""
Key-value logging with upstream's API (``configure``, ``logkv``, ``logkv_mean``, ``dumpkvs``,
``log``): a table on stdout, ``log.txt``, ``progress.csv`` and ``progress.json`` in the run
folder, and TensorBoard when it is installed (through torch, without TensorFlow).

Only rank 0 writes. ``logkv_mean`` values are averaged over ranks at ``dumpkvs``.
"""
from __future__ import annotations

import csv
import math
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, TextIO

from . import dist_util
from .files import atomic_write

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class KVWriter:
    def writekvs(self, kvs: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SeqWriter:
    def writeseq(self, seq: List[str]) -> None:
        raise NotImplementedError


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:<8.3g}"
    return str(v)


class HumanOutputFormat(KVWriter, SeqWriter):
    """A boxed key/value table, to a stream (stdout) or a file (log.txt)."""

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "a")
            self.own_file = True
        else:
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs):
        rows = [(k[:40], _fmt(v)[:40]) for k, v in sorted(kvs.items())]
        if not rows:
            return
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        bar = "-" * (kw + vw + 7)
        lines = [bar] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [bar]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(str(s) for s in seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dump (progress.json)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.file = open(filename, "a")

    def writekvs(self, kvs):
        self.file.write(json.dumps({k: (float(v) if hasattr(v, "dtype") else v) for k, v in kvs.items()}) + "\n")
        self.file.flush()

    def drop_rows_from(self, key: str, value: float) -> int:
        """Remove the rows whose ``key`` is >= ``value`` (atomically); return how many."""
        self.file.flush()
        with open(self.filename) as f:
            lines = f.read().splitlines(keepends=True)
        keep = [line for line in lines if not _at_or_after(_json_value(line, key), value)]
        dropped = len(lines) - len(keep)
        if dropped:
            self.file.close()
            atomic_write(self.filename, lambda f: f.writelines(keep), text=True, keep_mode=True)
            self.file = open(self.filename, "a")
        return dropped

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """progress.csv; a new key rewrites the file with the wider header (earlier rows keep blanks)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.keys: List[str] = []
        if os.path.exists(filename) and os.path.getsize(filename) > 0:
            with open(filename, newline="") as f:  # appending to a resumed run's file
                self.keys = next(csv.reader(f), [])

    def writekvs(self, kvs):
        new = [k for k in kvs if k not in self.keys]
        if new:
            rows = []
            if os.path.exists(self.filename):
                with open(self.filename, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.keys.extend(sorted(new))
            with open(self.filename, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.keys)
                w.writeheader()
                w.writerows(rows)
        with open(self.filename, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.keys).writerow({k: kvs.get(k, "") for k in self.keys})

    def drop_rows_from(self, key: str, value: float) -> int:
        """Remove the rows whose ``key`` is >= ``value`` (atomically, header kept); return how many."""
        if not os.path.exists(self.filename) or not self.keys or key not in self.keys:
            return 0
        with open(self.filename, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if not _at_or_after(r.get(key), value)]
        if len(keep) < len(rows):
            def write(f):
                w = csv.DictWriter(f, fieldnames=self.keys, extrasaction="ignore")
                w.writeheader()
                w.writerows(keep)

            atomic_write(self.filename, write, text=True, newline="", keep_mode=True)
        return len(rows) - len(keep)


def _at_or_after(v: Any, value: float) -> bool:
    try:
        return float(v) >= value
    except (TypeError, ValueError):
        return False  # no such key in the row, or not a number: kept


def _json_value(line: str, key: str) -> Any:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get(key) if isinstance(row, dict) else None


class TensorBoardOutputFormat(KVWriter):
    def __init__(self, dirname: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(dirname)
        self.step = 0

    def writekvs(self, kvs):
        step = int(kvs.get("step", self.step))
        for k, v in kvs.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.step = step + 1

    def close(self):
        self.writer.close()


def make_output_format(fmt: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    os.makedirs(ev_dir, exist_ok=True)
    if fmt == "stdout":
        return HumanOutputFormat(sys.stdout)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if fmt == "tensorboard":
        return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(f"unknown log format {fmt!r}; expected stdout, log, json, csv or tensorboard")


class Logger:
    """Accumulates key/values between dumps and writes them to every output format."""

    CURRENT: Optional["Logger"] = None

    def __init__(self, dir: Optional[str], output_formats: List[KVWriter], comm=None):
        self.name2val: Dict[str, Any] = defaultdict(float)
        self.name2cnt: Dict[str, int] = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        old, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self) -> Dict[str, Any]:
        d = dict(self.name2val)
        d = _average_over_ranks(d, dict(self.name2cnt))
        if d is not None:
            for fmt in self.output_formats:
                fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return d or {}

    def drop_rows_from(self, value: float, key: str = "step") -> int:
        """Drop the progress rows (CSV, JSON) whose ``key`` is >= ``value``; return how many (per file, max)."""
        counts = [fmt.drop_rows_from(key, value) for fmt in self.output_formats if hasattr(fmt, "drop_rows_from")]
        return max(counts, default=0)

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(list(map(str, args)))

    def set_level(self, level):
        self.level = level

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def _average_over_ranks(vals: Dict[str, Any], counts: Dict[str, int]) -> Optional[Dict[str, Any]]:
    """Count-weighted mean of the ``logkv_mean`` keys over ranks; None on ranks other than 0."""
    if not dist_util.is_distributed():
        return vals
    import torch.distributed as dist

    gathered: List[Any] = [None] * dist_util.get_world_size()
    dist.all_gather_object(gathered, (vals, counts))  # tolerant of ranks that logged other keys
    if dist_util.get_rank() != 0:
        return None
    out = dict(vals)
    totals: Dict[str, float] = defaultdict(float)
    weights: Dict[str, float] = defaultdict(float)
    for v, c in gathered:
        for k, n in c.items():
            totals[k] += float(v[k]) * n
            weights[k] += n
    for k in totals:
        out[k] = totals[k] / weights[k]
    return out


def get_current() -> Logger:
    if Logger.CURRENT is None:
        Logger.CURRENT = Logger(None, [HumanOutputFormat(sys.stdout)])
    return Logger.CURRENT


def logkv(key, val):
    """Log a value for this iteration (the last call before ``dumpkvs`` wins)."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Log a value whose mean over the calls of this iteration (and over ranks) is written."""
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]):
    for k, v in d.items():
        logkv(k, v)


def dumpkvs() -> Dict[str, Any]:
    """Write the accumulated key/values (all ranks must call it) and clear them."""
    return get_current().dumpkvs()


def drop_rows_from(value: float, key: str = "step") -> int:
    """
    Remove the rows whose ``key`` is >= ``value`` from progress.csv and progress.json (each file
    rewritten atomically): a run resumed from a checkpoint of step N logs steps N, N+1, ...
    again, so the rows an interrupted run wrote after that checkpoint would otherwise appear
    twice. Rank 0 only (other ranks write nothing).

    :return: how many rows were dropped (from the file that lost the most).
    """
    return get_current().drop_rows_from(value, key)


def getkvs():
    return get_current().name2val


def log(*args, level=INFO):
    """Write a line to stdout and log.txt (rank 0)."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    get_current().set_level(level)


def get_dir() -> Optional[str]:
    """The run folder (None before ``configure``)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


def default_log_dir(name: str = "run") -> str:
    """``runs/<name>-<timestamp>`` under the working directory (never /tmp)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{name}-{stamp}")


def get_rank_without_mpi_import() -> int:
    """
    This process's MPI rank read from the launcher's environment (``PMI_RANK``, MPICH/Hydra;
    ``OMPI_COMM_WORLD_RANK``, Open MPI; and ``PMIX_RANK``), without importing mpi4py (which would
    call ``MPI_Init()``), then torchrun's ``RANK`` (this project launches with torchrun too); 0 when
    none is set (upstream's helper). ``configure`` uses it before a process group exists, so that
    only rank 0 writes.
    """
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


def configure(dir: Optional[str] = None, format_strs: Optional[List[str]] = None, comm=None, log_suffix: str = ""):
    """
    Start logging into a run folder.

    :param dir: the folder; ``OPENAI_LOGDIR`` or ``runs/run-<timestamp>`` when None.
    :param format_strs: outputs among stdout, log, csv, json, tensorboard
        (``OPENAI_LOG_FORMAT``, default stdout,log,csv). Ranks other than 0 write nothing.
    """
    dir = dir or os.environ.get("OPENAI_LOGDIR") or default_log_dir()
    dir = os.path.expanduser(dir)
    if format_strs is None:
        format_strs = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
    format_strs = [f for f in format_strs if f]
    if "tensorboard" in format_strs:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            format_strs = [f for f in format_strs if f != "tensorboard"]
    # without a process group (yet), an MPI launcher's environment says which rank this is
    if (dist_util.get_rank() if dist_util.is_distributed() else get_rank_without_mpi_import()) != 0:
        format_strs = []
    else:
        os.makedirs(dir, exist_ok=True)
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(dir, [make_output_format(f, dir, log_suffix) for f in format_strs], comm=comm)
    if format_strs:
        log(f"Logging to {dir}")


@contextmanager
def profile_kv(scopename: str):
    """Add the wall-clock seconds spent in the block to ``wait_<scopename>``."""
    t0 = time.time()
    try:
        yield
    finally:
        get_current().name2val["wait_" + scopename] += time.time() - t0


def profile(n: str):
    """
    Decorator: add the wall-clock seconds of every call of the function to ``wait_<n>`` (as
    ``profile_kv(n)`` around the call).

    Usage::

        @profile("load")
        def load_batch(): ...
    """
    import functools

    def decorator_with_name(func):
        @functools.wraps(func)
        def func_wrapper(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return func_wrapper

    return decorator_with_name


def set_comm(comm) -> None:
    """Store ``comm`` on the current logger (upstream's MPI communicator; averaging over ranks at
    ``dumpkvs`` uses torch.distributed here, whatever is stored)."""
    get_current().comm = comm


def reset() -> None:
    """Close the current logger; logging goes to stdout only until the next ``configure``."""
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
        Logger.CURRENT = None
    log("Reset logger")


@contextmanager
def scoped_configure(dir: Optional[str] = None, format_strs: Optional[List[str]] = None, comm=None):
    """
    Context manager: log into ``dir`` (``configure(dir, format_strs, comm)``) inside the block,
    then close that logger and restore the previous one, whose files stay open.
    """
    prev_logger = Logger.CURRENT
    Logger.CURRENT = None  # so configure() does not close the previous logger
    try:
        configure(dir=dir, format_strs=format_strs, comm=comm)
        yield
    finally:
        if Logger.CURRENT is not None:
            Logger.CURRENT.close()
        Logger.CURRENT = prev_logger


def mpi_weighted_mean(comm, local_name2valcount: Dict[str, Any]) -> Dict[str, float]:
    """
    Count-weighted means over the ranks of an MPI communicator (upstream's helper).

    :param comm: an mpi4py communicator (anything with ``gather`` and ``rank``).
    :param local_name2valcount: {name: (value, count)} of this rank.
    :return: on rank 0 {name: sum(value * count) / sum(count)}; on the other ranks {}.
        Values that are not numbers are skipped with a warning.
    """
    gathered = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    sums: Dict[str, float] = defaultdict(float)
    counts: Dict[str, float] = defaultdict(float)
    for name2valcount in gathered:
        for name, (val, count) in name2valcount.items():
            try:
                val = float(val)
            except (TypeError, ValueError):
                import warnings

                warnings.warn(f"mpi_weighted_mean: {name}={val!r} is not a number; skipped")
                continue
            sums[name] += val * count
            counts[name] += count
    return {name: sums[name] / counts[name] for name in sums}


# --------------------------------------------------------------------------------------
# The progress line of long loops (sampling, feature extraction)
# --------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """A duration for progress lines: ``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressLog:
    """
    The progress of a long loop over ``total`` items (samples drawn, images run through the
    Inception network).

    On a terminal it is a tqdm bar. Otherwise (output redirected to a file, a batch job, ``nohup``)
    a tqdm bar is disabled or writes carriage returns that a log file shows as one garbled line,
    so it writes plain lines instead, flushed: ``desc: done/total unit (p%), r unit/s, ETA t,
    elapsed t`` each time another ``every`` of the total is done, at least every ``interval_s``
    seconds, and at the end. A two-hour CPU extraction then shows that it is alive and when it ends.
    """

    def __init__(self, total: int, desc: str, unit: str = "images", every: float = 0.1,
                 interval_s: float = 60.0, stream: Optional[TextIO] = None, enabled: bool = True,
                 leave: bool = True):
        """
        :param total: the number of items.
        :param desc: what is counted, the start of each line (e.g. ``sampling``).
        :param unit: the items' name in the lines.
        :param every: a line each time this fraction of ``total`` more is done.
        :param interval_s: and a line at least this often (seconds) while items are done.
        :param stream: where to write (default ``sys.stderr`` at the time of each write).
        :param enabled: False: report nothing.
        :param leave: keep the tqdm bar on the terminal when done.
        """
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.every = float(every)
        self.interval_s = float(interval_s)
        self._stream = stream
        self.enabled = bool(enabled) and self.total > 0
        self.done = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._next_mark = self._mark(1)
        self._marks = 1
        self.bar = None
        if self.enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit="img" if unit == "images" else unit,
                            file=self.stream, leave=leave)

    @property
    def stream(self) -> TextIO:
        # looked up at each write: pytest's capsys and redirections replace sys.stderr after import
        return self._stream if self._stream is not None else sys.stderr

    def _mark(self, k: int) -> int:
        return min(self.total, max(1, math.ceil(self.total * self.every * k)))

    def line(self) -> str:
        """The current progress line."""
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        left = (self.total - self.done) / rate if self.done and rate > 0 else float("nan")
        eta = format_seconds(left) if math.isfinite(left) else "?"
        shown = f"{rate:.3g}" if math.isfinite(rate) else "?"
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%), "
                f"{shown} {self.unit}/s, ETA {eta}, elapsed {format_seconds(elapsed)}")

    def update(self, n: int) -> None:
        """``n`` more items are done."""
        if not self.enabled:
            return
        self.done = min(self.total, self.done + int(n))
        if self.bar is not None:
            self.bar.update(int(n))
            return
        now = time.monotonic()
        if self.done >= self._next_mark or now - self._last_line >= self.interval_s or self.done >= self.total:
            print(self.line(), file=self.stream, flush=True)
            self._last_line = now
            while self._next_mark <= self.done and self._next_mark < self.total:
                self._marks += 1
                self._next_mark = self._mark(self._marks)
            if self.done >= self.total:
                self._next_mark = self.total + 1  # the final line is written once

    def close(self) -> None:
        """End the bar (a terminal); the lines need no closing."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
