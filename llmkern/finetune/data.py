"""The embedded Text2SQL data set: seeded SQLite databases, question/SQL pairs, cleaning and splits.

``build_dataset(seed, directory)`` writes one SQLite file per schema of :mod:`llmkern.finetune.schemas`
and returns a :class:`Dataset`: pairs of a natural-language question (English or Korean) and its gold
SQL, covering SELECT / WHERE / ORDER BY / LIMIT / COUNT / aggregates / GROUP BY / JOIN. Splits:

* ``train`` and ``valid``: questions over the training schemas.
* ``test``: questions over the training schemas whose gold SQL appears in no training or validation
  pair (``schema_seen=True``), and questions over the held-out schemas (``schema_seen=False``).

Pairs are split by gold SQL, so the English and Korean questions of one query land in the same split.
The prompt (:func:`prompt`) is the usual Text2SQL one: the tables with their typed columns, then the
question; the model continues with the SQL.
"""
from __future__ import annotations

import hashlib
import random
import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkern.finetune.schemas import HELD_OUT_SCHEMAS, SCHEMAS, TRAIN_SCHEMAS, Column, Schema, Table, get_schema

SQL_TYPES = {"INTEGER": "int", "REAL": "real", "TEXT": "text"}


@dataclass(frozen=True)
class Example:
    """One question/SQL pair over the database ``schema``; ``template`` names the kind of query."""

    schema: str
    question: str
    sql: str
    lang: str  # "en" | "ko"
    template: str
    schema_seen: bool = True


@dataclass
class CleaningReport:
    """What :func:`clean` kept and dropped, and why."""

    kept: int = 0
    unexecutable: int = 0
    empty_result: int = 0
    duplicate: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.unexecutable + self.empty_result + self.duplicate


@dataclass
class Dataset:
    """The splits, the database file of each schema, and the cleaning report."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    databases: dict[str, Path]
    cleaning: CleaningReport
    rows: dict[str, dict[str, list[tuple]]] = field(default_factory=dict)  # schema -> table -> rows

    def summary(self) -> dict:
        seen = sum(e.schema_seen for e in self.test)
        return {
            "train": len(self.train), "valid": len(self.valid),
            "test_seen_schemas": seen, "test_held_out_schemas": len(self.test) - seen,
            "cleaning": {k: v for k, v in asdict(self.cleaning).items() if k != "errors"},
        }


def schema_text(schema: Schema) -> str:
    """``department(id int, name text, ...); student(...)``: the tables, columns and types of a prompt."""
    return "; ".join(f"{t.name}({', '.join(f'{c.name} {SQL_TYPES[c.type]}' for c in t.columns)})" for t in schema.tables)


def prompt(schema: Schema | str, question: str) -> str:
    """The Text2SQL prompt: tables, question, and ``sql: ``, after which the model writes the query."""
    schema = get_schema(schema) if isinstance(schema, str) else schema
    return f"tables: {schema_text(schema)}\nquestion: {question}\nsql: "


# --------------------------------------------------------------------------------------------- databases

def _value(column: Column, rng: random.Random):
    if column.type == "TEXT":
        return rng.choice(column.values)
    low, high = column.values
    return rng.randint(low, high) if column.type == "INTEGER" else round(rng.uniform(low, high), 1)


def _rows(table: Table, rng: random.Random, n_parents: int) -> list[tuple]:
    rows = []
    for i in range(1, table.rows + 1):
        row = []
        for c in table.columns:
            if c.kind == "key":
                row.append(i)
            elif c.kind == "foreign":
                row.append(rng.randint(1, n_parents))
            elif c.kind == "label" and len(c.values) >= table.rows:
                row.append(None)  # filled below with distinct labels
            else:
                row.append(_value(c, rng))
        rows.append(row)
    for j, c in enumerate(table.columns):
        if c.kind == "label" and len(c.values) >= table.rows:
            for row, label in zip(rows, rng.sample(c.values, table.rows)):
                row[j] = label
    return [tuple(r) for r in rows]


def build_database(schema: Schema, path: Path, seed: int) -> dict[str, list[tuple]]:
    """Create the SQLite file ``path`` for ``schema`` with seeded rows (replacing any old file).

    Returns the rows of each table, by table name.
    """
    rng = random.Random(f"{seed}:{schema.name}:rows")
    parents = _rows(schema.parent, rng, 0)
    children = _rows(schema.child, rng, len(parents))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        for table, rows in ((schema.parent, parents), (schema.child, children)):
            cols = ", ".join(
                f"{c.name} {c.type}" + (" PRIMARY KEY" if c.kind == "key" else "")
                + (f" REFERENCES {schema.parent.name}(id)" if c.kind == "foreign" else "")
                for c in table.columns)
            conn.execute(f"CREATE TABLE {table.name} ({cols})")
            conn.executemany(f"INSERT INTO {table.name} VALUES ({', '.join('?' * len(table.columns))})", rows)
        conn.commit()
    finally:
        conn.close()
    tmp.replace(path)
    return {schema.parent.name: parents, schema.child.name: children}


# --------------------------------------------------------------------------------------------- questions

def _has_final_consonant(word: str) -> bool:
    """Whether the last syllable of a Korean noun has a final consonant (batchim): picks 이/가, 을/를..."""
    code = ord(word[-1]) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def _ko(word: str, with_final: str, without_final: str) -> str:
    return word + (with_final if _has_final_consonant(word) else without_final)


def _quote(value) -> str:
    return "'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(value)


class _Generator:
    """Draws one (sql, English question, Korean question) triple per call from a schema and its rows."""

    def __init__(self, schema: Schema, rows: dict[str, list[tuple]], rng: random.Random):
        self.schema, self.rows, self.rng = schema, rows, rng
        self.templates = [
            ("select", 1), ("where_number", 3), ("where_text", 3), ("count", 1), ("count_where", 3),
            ("top_k", 3), ("order", 2), ("aggregate", 3), ("group_count", 2), ("group_aggregate", 2),
            ("join_where", 3), ("join_group", 2),
        ]

    def draw(self) -> tuple[str, str, str, str]:
        names, weights = zip(*self.templates)
        template = self.rng.choices(names, weights)[0]
        return (template, *getattr(self, "_" + template)())

    # helpers
    def _table(self) -> Table:
        return self.rng.choice(self.schema.tables)

    def _pick(self, table: Table, *kinds: str) -> Column:
        return self.rng.choice(table.of_kind(*kinds))

    def _row_value(self, table: Table, column: Column):
        j = table.columns.index(column)
        return self.rng.choice(self.rows[table.name])[j]

    def _number_filter(self, table: Table):
        n = self._pick(table, "number")
        v = _value(n, self.rng)  # any value of the column's range, so a model must copy it, not recall it
        greater = self.rng.random() < 0.5
        en = f"{n.en} {'greater' if greater else 'less'} than {v}"
        ko = f"{_ko(n.ko, '이', '가')} {v}보다 {'큰' if greater else '작은'}"
        return f"{n.name} {'>' if greater else '<'} {v}", en, ko

    def _text_filter(self, table: Table, prefix: str = ""):
        t = self._pick(table, "category")
        v = self._row_value(table, t)
        return f"{prefix}{t.name} = {_quote(v)}", t, v

    # templates: each returns (sql, en, ko)
    def _select(self):
        t = self._table()
        c = self._pick(t, "label", "category")
        en = self.rng.choice([f"List the {c.en} of all {t.en}.", f"Show the {c.en} of every {t.en_one}."])
        ko = f"모든 {t.ko}의 {_ko(c.ko, '을', '를')} 보여 주세요."
        return f"SELECT {c.name} FROM {t.name}", en, ko

    def _where_number(self):
        t = self._table()
        c = self._pick(t, "label")
        cond, en_cond, ko_cond = self._number_filter(t)
        en = self.rng.choice([f"Show the {c.en} of {t.en} with {en_cond}.", f"Which {t.en} have {en_cond}? Give their {c.en}."])
        ko = f"{ko_cond} {t.ko}의 {_ko(c.ko, '을', '를')} 보여 주세요."
        return f"SELECT {c.name} FROM {t.name} WHERE {cond}", en, ko

    def _where_text(self):
        t = self._table()
        c = self._pick(t, "label")
        cond, f, v = self._text_filter(t)
        en = self.rng.choice([f"Show the {c.en} of {t.en} whose {f.en} is {v}.", f"Find the {c.en} of the {t.en} with {f.en} {v}."])
        ko = f"{_ko(f.ko, '이', '가')} {v}인 {t.ko}의 {_ko(c.ko, '을', '를')} 보여 주세요."
        return f"SELECT {c.name} FROM {t.name} WHERE {cond}", en, ko

    def _count(self):
        t = self._table()
        en = self.rng.choice([f"How many {t.en} are there?", f"Count the {t.en}."])
        ko = f"{_ko(t.ko, '은', '는')} 모두 몇 {t.counter}인가요?"
        return f"SELECT COUNT(*) FROM {t.name}", en, ko

    def _count_where(self):
        t = self._table()
        if self.rng.random() < 0.5:
            cond, en_cond, ko_cond = self._number_filter(t)
        else:
            cond, f, v = self._text_filter(t)
            en_cond, ko_cond = f"{f.en} {v}", f"{_ko(f.ko, '이', '가')} {v}인"
        en = f"How many {t.en} have {en_cond}?"
        ko = f"{ko_cond} {_ko(t.ko, '은', '는')} 몇 {t.counter}인가요?"
        return f"SELECT COUNT(*) FROM {t.name} WHERE {cond}", en, ko

    def _top_k(self):
        t = self._table()
        c, n = self._pick(t, "label"), self._pick(t, "number")
        k = self.rng.randint(1, 5)
        high = self.rng.random() < 0.5
        en_most, ko_most = ("highest", "높은") if high else ("lowest", "낮은")
        sql = f"SELECT {c.name} FROM {t.name} ORDER BY {n.name} {'DESC' if high else 'ASC'} LIMIT {k}"
        if k == 1:
            en = f"What is the {c.en} of the {t.en_one} with the {en_most} {n.en}?"
            ko = f"{_ko(n.ko, '이', '가')} 가장 {ko_most} {t.ko}의 {_ko(c.ko, '은', '는')} 무엇인가요?"
        else:
            en = f"Show the {c.en} of the {k} {t.en} with the {en_most} {n.en}."
            ko = f"{_ko(n.ko, '이', '가')} 가장 {ko_most} {t.ko} {k}{t.counter}의 {_ko(c.ko, '을', '를')} 보여 주세요."
        return sql, en, ko

    def _order(self):
        t = self._table()
        c, n = self._pick(t, "label"), self._pick(t, "number")
        asc = self.rng.random() < 0.5
        en = f"List the {c.en} and {n.en} of all {t.en}, sorted by {n.en} in {'ascending' if asc else 'descending'} order."
        ko = f"모든 {t.ko}의 {_ko(c.ko, '과', '와')} {_ko(n.ko, '을', '를')} {n.ko} {'오름차순' if asc else '내림차순'}으로 보여 주세요."
        return f"SELECT {c.name}, {n.name} FROM {t.name} ORDER BY {n.name} {'ASC' if asc else 'DESC'}", en, ko

    _AGGREGATES = (("AVG", "average", "평균"), ("MAX", "maximum", "최대"), ("MIN", "minimum", "최소"), ("SUM", "total", "총"))

    def _aggregate(self):
        t = self._table()
        n = self._pick(t, "number")
        fn, en_fn, ko_fn = self.rng.choice(self._AGGREGATES)
        sql = f"SELECT {fn}({n.name}) FROM {t.name}"
        if self.rng.random() < 0.5:
            en = f"What is the {en_fn} {n.en} of all {t.en}?"
            ko = f"{t.ko}의 {ko_fn} {_ko(n.ko, '은', '는')} 얼마인가요?"
        else:
            cond, f, v = self._text_filter(t)
            sql += f" WHERE {cond}"
            en = f"What is the {en_fn} {n.en} of {t.en} whose {f.en} is {v}?"
            ko = f"{_ko(f.ko, '이', '가')} {v}인 {t.ko}의 {ko_fn} {_ko(n.ko, '은', '는')} 얼마인가요?"
        return sql, en, ko

    def _group_count(self):
        t = self._table()
        g = self._pick(t, "category")
        en = self.rng.choice([f"How many {t.en} are there for each {g.en}?", f"Count the {t.en} in each {g.en}."])
        ko = f"{g.ko}별 {t.ko} 수를 보여 주세요."
        return f"SELECT {g.name}, COUNT(*) FROM {t.name} GROUP BY {g.name}", en, ko

    def _group_aggregate(self):
        t = self._table()
        g, n = self._pick(t, "category"), self._pick(t, "number")
        fn, en_fn, ko_fn = self.rng.choice(self._AGGREGATES[:3])
        en = f"What is the {en_fn} {n.en} of {t.en} for each {g.en}?"
        ko = f"{g.ko}별 {t.ko}의 {ko_fn} {_ko(n.ko, '을', '를')} 보여 주세요."
        return f"SELECT {g.name}, {fn}({n.name}) FROM {t.name} GROUP BY {g.name}", en, ko

    def _join(self) -> str:
        s = self.schema
        return f"FROM {s.child.name} AS T1 JOIN {s.parent.name} AS T2 ON T1.{s.foreign_key} = T2.id"

    def _join_where(self):
        s = self.schema
        c = self._pick(s.child, "label")
        f = self._pick(s.parent, "label", "category")
        v = self._row_value(s.parent, f)
        en = self.rng.choice([f"Show the {c.en} of {s.child.en} whose {s.parent.en_one} {f.en} is {v}.",
                              f"Find the {c.en} of all {s.child.en} of the {s.parent.en_one} with {f.en} {v}."])
        ko = f"{s.parent.ko} {_ko(f.ko, '이', '가')} {v}인 {s.child.ko}의 {_ko(c.ko, '을', '를')} 보여 주세요."
        return f"SELECT T1.{c.name} {self._join()} WHERE T2.{f.name} = {_quote(v)}", en, ko

    def _join_group(self):
        s = self.schema
        g = self._pick(s.parent, "label", "category")
        en = self.rng.choice([f"How many {s.child.en} are there for each {s.parent.en_one} {g.en}?",
                              f"Count the {s.child.en} of each {s.parent.en_one}, by {s.parent.en_one} {g.en}."])
        ko = f"{s.parent.ko} {g.ko}별 {s.child.ko} 수를 보여 주세요."
        return f"SELECT T2.{g.name}, COUNT(*) {self._join()} GROUP BY T2.{g.name}", en, ko


def generate(schema: Schema, rows: dict[str, list[tuple]], n: int, seed: int, stream: str = "questions") -> list[Example]:
    """``n`` draws of a random template over ``schema``, each giving an English and then a Korean
    pair (so ``2 * n`` examples, duplicates included: :func:`clean` removes them). ``stream`` names
    an independent random sequence for the same seed."""
    rng = random.Random(f"{seed}:{schema.name}:{stream}")
    gen = _Generator(schema, rows, rng)
    out = []
    for _ in range(n):
        template, sql, en, ko = gen.draw()
        seen = schema.name not in HELD_OUT_SCHEMAS
        out.append(Example(schema.name, en, sql, "en", template, seen))
        out.append(Example(schema.name, ko, sql, "ko", template, seen))
    return out


# --------------------------------------------------------------------------------------------- cleaning

def clean(examples: list[Example], databases: dict[str, Path]) -> tuple[list[Example], CleaningReport]:
    """Drop pairs whose gold SQL does not execute, returns no rows, or repeats an earlier question of
    the same schema (the first one is kept). Returns the kept pairs, in order, and the counts."""
    report = CleaningReport()
    kept, seen = [], set()
    conns = {name: sqlite3.connect(f"file:{path}?mode=ro", uri=True) for name, path in databases.items()}
    try:
        for ex in examples:
            key = (ex.schema, ex.question.strip().lower())
            if key in seen:
                report.duplicate += 1
                continue
            try:
                rows = conns[ex.schema].execute(ex.sql).fetchall()
            except (sqlite3.Error, KeyError) as exc:
                report.unexecutable += 1
                report.errors.append(f"{ex.schema}: {ex.sql!r}: {exc}")
                continue
            if not rows or all(v is None for row in rows for v in row):
                report.empty_result += 1
                continue
            seen.add(key)
            kept.append(ex)
    finally:
        for conn in conns.values():
            conn.close()
    report.kept = len(kept)
    return kept, report


# --------------------------------------------------------------------------------------------- splits

def _bucket(text: str, seed: int) -> float:
    """A seeded, order-independent number in [0, 1) for ``text``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "little") / 2.0**64


def _balanced_sample(examples: list[Example], n: int, rng: random.Random) -> list[Example]:
    """Up to ``n`` examples, half English and half Korean where possible, in a seeded order."""
    by_lang = {lang: [e for e in examples if e.lang == lang] for lang in ("en", "ko")}
    for pool in by_lang.values():
        rng.shuffle(pool)
    take = min(n // 2, len(by_lang["en"]), len(by_lang["ko"]))
    out = by_lang["en"][:take] + by_lang["ko"][:take]
    rng.shuffle(out)
    return out


def build_dataset(directory: str | Path, seed: int = 0, draws_per_schema: int = 1500,
                  n_valid: int = 64, n_test_seen: int = 160, n_test_held_out: int = 96) -> Dataset:
    """Build the databases under ``directory`` and the cleaned, split pairs (all seeded by ``seed``).

    Over the training schemas, each distinct gold SQL goes to test with probability 0.2 and to valid
    with 0.05 (then test and valid are subsampled to ``n_test_seen`` / ``n_valid`` pairs, half English,
    half Korean); the held-out schemas give ``n_test_held_out`` test pairs.
    """
    directory = Path(directory)
    databases, pairs, all_rows = {}, [], {}
    for schema in SCHEMAS:
        path = directory / f"{schema.name}.sqlite"
        rows = build_database(schema, path, seed)
        databases[schema.name] = path
        all_rows[schema.name] = rows
        pairs += generate(schema, rows, draws_per_schema if schema.name in TRAIN_SCHEMAS else draws_per_schema // 4, seed)
    pairs, report = clean(pairs, databases)
    rng = random.Random(f"{seed}:splits")
    train, valid, test_seen, held_out = [], [], [], []
    for ex in pairs:
        if not ex.schema_seen:
            held_out.append(ex)
            continue
        u = _bucket(f"{ex.schema}:{ex.sql}", seed)
        (test_seen if u < 0.2 else valid if u < 0.25 else train).append(ex)
    rng.shuffle(train)
    test = _balanced_sample(test_seen, n_test_seen, rng) + _balanced_sample(held_out, n_test_held_out, rng)
    return Dataset(train, _balanced_sample(valid, n_valid, rng), test, databases, report, all_rows)


def template_counts(examples: list[Example]) -> dict[str, int]:
    """How many examples of each template (for reports and tests)."""
    return dict(sorted(Counter(e.template for e in examples).items()))
