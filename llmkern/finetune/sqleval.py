"""Text2SQL evaluation: exact match and execution accuracy, with predicted SQL run in a sandbox.

Execution accuracy runs the gold and the predicted query on the example's SQLite database and
compares the result sets: as ordered lists when the gold query has ``ORDER BY``, else as multisets;
floats are compared to 1e-6 relative. A predicted query that fails for any reason (syntax, unknown
column, more than one statement, a denied operation, the time or row limit) counts as wrong.

A predicted query cannot change the database or hang the evaluation (:func:`connect_readonly`):

* the file is opened with SQLite's ``mode=ro`` URI, so the connection cannot write;
* an authorizer allows only reading tables, selecting, recursive CTEs and an allow-list of pure
  SQL functions: no ATTACH/DETACH, no PRAGMA, no DDL or DML, no ``load_extension``;
* a progress handler aborts any statement that runs longer than ``time_limit`` seconds (an endless
  recursive CTE), and a statement returning more than ``max_rows`` rows is stopped;
* string/blob sizes are capped (``zeroblob(1e9)`` fails instead of allocating a gigabyte).
"""
from __future__ import annotations

import math
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ALLOWED_FUNCTIONS = frozenset({
    "abs", "avg", "count", "group_concat", "max", "min", "sum", "total", "coalesce", "ifnull", "iif",
    "nullif", "instr", "length", "lower", "upper", "ltrim", "rtrim", "trim", "replace", "round",
    "substr", "substring", "like", "glob", "typeof",
})
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}


class QueryError(Exception):
    """A query could not be evaluated: it failed, was denied, or ran past a limit."""


def _authorizer(action, arg1, arg2, db_name, trigger):
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in ALLOWED_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def connect_readonly(path: str | Path, max_length: int = 1_000_000) -> sqlite3.Connection:
    """Open the SQLite file ``path`` read-only, with the authorizer and size limits described above.

    Raises ``FileNotFoundError`` if it does not exist (``mode=ro`` never creates a file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"connect_readonly: no SQLite database at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")  # before the authorizer, which denies every PRAGMA
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_length)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorizer)
    return conn


def run_query(conn: sqlite3.Connection, sql: str, time_limit: float = 1.0, max_rows: int = 10_000) -> list[tuple]:
    """All rows of ``sql`` on ``conn`` (from :func:`connect_readonly`); raises :class:`QueryError`
    if it fails, runs longer than ``time_limit`` seconds or returns more than ``max_rows`` rows."""
    deadline = time.monotonic() + time_limit
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        cursor = conn.execute(sql)
        rows = cursor.fetchmany(max_rows + 1)
        cursor.close()
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as exc:
        raise QueryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        raise QueryError(f"more than {max_rows} rows")
    return rows


def _canonical(value):
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else value
    return value


def results_match(gold: list[tuple], predicted: list[tuple], ordered: bool) -> bool:
    """Whether two result sets are equal: same rows (values compared after rounding floats to 6
    significant digits), in the same order when ``ordered``, else as multisets."""
    g = [tuple(_canonical(v) for v in row) for row in gold]
    p = [tuple(_canonical(v) for v in row) for row in predicted]
    return g == p if ordered else Counter(g) == Counter(p)


_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\d+(?:\.\d+)?|\w+|<=|>=|<>|!=|==|\|\||\S")


def normalize_sql(sql: str) -> str:
    """``sql`` with whitespace collapsed, keywords and identifiers lower-cased (string literals kept),
    and a trailing ``;`` removed: the form compared by exact match."""
    tokens = _TOKEN.findall(sql.strip().rstrip(";"))
    return " ".join(t if t.startswith(("'", '"')) else t.lower() for t in tokens)


def exact_match(gold: str, predicted: str) -> bool:
    return normalize_sql(gold) == normalize_sql(predicted)


def _has_order_by(sql: str) -> bool:
    return re.search(r"\border\s+by\b", normalize_sql(sql)) is not None


@dataclass
class Judgement:
    """The verdict on one prediction."""

    exact: bool
    executes: bool
    correct: bool
    error: str | None = None


class Evaluator:
    """Judges predictions against gold SQL on a set of databases (``{schema name: sqlite path}``),
    keeping one read-only connection per database. Use as a context manager or call :meth:`close`."""

    def __init__(self, databases: dict[str, str | Path], time_limit: float = 1.0, max_rows: int = 10_000):
        self.time_limit, self.max_rows = time_limit, max_rows
        self._conns = {name: connect_readonly(path) for name, path in databases.items()}
        self._gold: dict[tuple[str, str], list[tuple]] = {}

    def judge(self, schema: str, gold_sql: str, predicted_sql: str) -> Judgement:
        """Exact match and execution match of ``predicted_sql`` against ``gold_sql`` on ``schema``'s
        database. The gold query must run (it raises :class:`QueryError` otherwise)."""
        if schema not in self._conns:
            raise ValueError(f"Evaluator.judge: schema must be one of {sorted(self._conns)}, got {schema!r}")
        conn = self._conns[schema]
        key = (schema, gold_sql)
        if key not in self._gold:
            self._gold[key] = run_query(conn, gold_sql, self.time_limit, self.max_rows)
        exact = exact_match(gold_sql, predicted_sql)
        try:
            rows = run_query(conn, predicted_sql, self.time_limit, self.max_rows)
        except QueryError as exc:
            return Judgement(exact, False, False, str(exc))
        return Judgement(exact, True, results_match(self._gold[key], rows, _has_order_by(gold_sql)))

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
