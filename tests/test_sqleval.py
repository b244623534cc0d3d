"""The Text2SQL evaluator: exact match, execution match, and the read-only, time-limited sandbox
that predicted SQL runs in (no GPU, no model: fast, in both CI passes)."""
from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest

from llmkern.finetune.sqleval import Evaluator, QueryError, connect_readonly, exact_match, normalize_sql, results_match, run_query

GOLD = "SELECT name FROM person WHERE age > 30"


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "people.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, score REAL)")
    conn.executemany("INSERT INTO person VALUES (?, ?, ?, ?)",
                     [(1, "Ann", 25, 1.5), (2, "Bob", 35, 2.25), (3, "Cy", 41, 0.1), (4, "Di", 35, 3.0)])
    conn.commit()
    conn.close()
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_normalize_and_exact_match():
    assert normalize_sql("select  NAME\nfrom person where age>30 ;") == "select name from person where age > 30"
    assert exact_match(GOLD, "select name from PERSON where age > 30;")
    assert not exact_match(GOLD, "SELECT name FROM person WHERE age >= 30")
    # string literals keep their case
    assert not exact_match("SELECT 1 FROM t WHERE c = 'Ann'", "SELECT 1 FROM t WHERE c = 'ann'")


def test_results_match_order_and_floats():
    assert results_match([(1,), (2,)], [(2,), (1,)], ordered=False)
    assert not results_match([(1,), (2,)], [(2,), (1,)], ordered=True)
    assert not results_match([(1,), (1,)], [(1,)], ordered=False)  # multisets, not sets
    assert results_match([(0.1 + 0.2,)], [(0.3,)], ordered=True)
    assert not results_match([(0.3,)], [(0.31,)], ordered=True)


def test_judge_execution_accuracy(database):
    with Evaluator({"people": database}) as ev:
        assert ev.judge("people", GOLD, GOLD).correct
        equivalent = ev.judge("people", GOLD, "SELECT name FROM person WHERE 30 < age ORDER BY id DESC")
        assert equivalent.correct and not equivalent.exact
        assert not ev.judge("people", GOLD, "SELECT name FROM person").correct
        broken = ev.judge("people", GOLD, "SELECT nme FROM person")
        assert not broken.executes and not broken.correct and "no such column" in broken.error
        ordered = "SELECT name FROM person ORDER BY score DESC"
        assert not ev.judge("people", ordered, "SELECT name FROM person ORDER BY score ASC").correct
        with pytest.raises(ValueError, match="Evaluator.judge: schema must be one of"):
            ev.judge("nope", GOLD, GOLD)


@pytest.mark.parametrize("sql", [
    "DROP TABLE person",
    "DELETE FROM person",
    "UPDATE person SET age = 0",
    "INSERT INTO person VALUES (9, 'Eve', 1, 1.0)",
    "CREATE TABLE t (x)",
    "ALTER TABLE person ADD COLUMN y",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA user_version = 7",
    "PRAGMA writable_schema = ON",
    "VACUUM",
    "BEGIN",
    "SELECT 1; DROP TABLE person",
    "SELECT load_extension('evil')",
    "SELECT zeroblob(1000000000)",
])
def test_malicious_sql_cannot_write(database, tmp_path, sql):
    before = _digest(database)
    with Evaluator({"people": database}) as ev:
        verdict = ev.judge("people", GOLD, sql)
        assert not verdict.correct and not verdict.executes
        assert ev.judge("people", GOLD, GOLD).correct  # the connection still works
    assert _digest(database) == before
    assert sqlite3.connect(database).execute("SELECT COUNT(*) FROM person").fetchone() == (4,)


def test_attach_and_vacuum_into_cannot_create_files(database, tmp_path):
    with Evaluator({"people": database}) as ev:
        for sql in (f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other", f"VACUUM INTO '{tmp_path / 'copy.db'}'"):
            assert not ev.judge("people", GOLD, sql).executes
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "copy.db").exists()


def test_readonly_even_without_the_authorizer(database):
    conn = connect_readonly(database)
    conn.set_authorizer(None)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM person")
    conn.close()


@pytest.mark.parametrize("sql", [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c ORDER BY 1",
    "SELECT COUNT(*) FROM person a, person b, person c, person d, person e, person f, person g, person h, "
    "person i, person j, person k, person l, person m, person n",
])
def test_endless_query_is_stopped(database, sql):
    with Evaluator({"people": database}, time_limit=0.2) as ev:
        start = time.monotonic()
        verdict = ev.judge("people", GOLD, sql)
        assert time.monotonic() - start < 5.0
        assert not verdict.executes and "interrupted" in verdict.error


def test_row_limit(database):
    conn = connect_readonly(database)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    with pytest.raises(QueryError, match="more than 100 rows"):
        run_query(conn, endless, max_rows=100)
    assert run_query(conn, "SELECT COUNT(*) FROM person") == [(4,)]
    conn.close()


def test_missing_database_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="connect_readonly: no SQLite database"):
        connect_readonly(tmp_path / "absent.sqlite")
    assert not (tmp_path / "absent.sqlite").exists()
