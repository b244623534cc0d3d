"""The embedded Text2SQL domains: six small SQLite schemas, each a parent table and a child table
linked by a foreign key, with English and Korean names for every table and column.

A column's ``kind`` tells the question generator what it can ask about it:

* ``label``: a row's display name (``name``, ``title``); selected and shown.
* ``category``: a text column with few distinct values (``city``, ``genre``); filtered on and grouped by.
* ``number``: an INTEGER or REAL column (``age``, ``price``); compared, ordered and aggregated.
* ``key`` / ``foreign``: ``id`` and the child's ``<parent>_id``; only used to join.

Column names recur across schemas (``name``, ``age``, ``city``, ``year``...), so what a model learns
about them on the training schemas can carry over to the held-out ones.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One column. ``values``: the pool of TEXT values, or ``(low, high)`` for numbers."""

    name: str
    type: str  # "INTEGER" | "REAL" | "TEXT"
    kind: str  # "key" | "foreign" | "label" | "category" | "number"
    en: str
    ko: str
    values: tuple = ()


@dataclass(frozen=True)
class Table:
    """One table. ``en``/``en_one``: plural/singular English noun; ``ko``: Korean noun;
    ``counter``: the Korean counter word for its rows (명, 개, 권...); ``rows``: how many rows to make."""

    name: str
    en: str
    en_one: str
    ko: str
    counter: str
    rows: int
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def of_kind(self, *kinds: str) -> list[Column]:
        return [c for c in self.columns if c.kind in kinds]


@dataclass(frozen=True)
class Schema:
    """A database of a ``parent`` and a ``child`` table; ``child.<foreign_key>`` references ``parent.id``."""

    name: str
    parent: Table
    child: Table
    foreign_key: str

    @property
    def tables(self) -> tuple[Table, Table]:
        return (self.parent, self.child)


def _key() -> Column:
    return Column("id", "INTEGER", "key", "id", "번호")


def _name(pool: tuple[str, ...]) -> Column:
    return Column("name", "TEXT", "label", "name", "이름", pool)


_PEOPLE = ("Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hyejin", "Ivan", "Jisoo",
           "Kenji", "Laura", "Minho", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Seojun", "Tomas",
           "Umar", "Vera", "Wei", "Yuna", "Zoe")
_CITIES = ("Seoul", "Busan", "Paris", "Berlin", "Tokyo", "Madrid")
_COUNTRIES = ("Korea", "France", "Japan", "Brazil", "Canada", "Italy")
_GENRES = ("rock", "jazz", "pop", "classical", "folk")

SCHEMAS: tuple[Schema, ...] = (
    Schema(
        "school",
        Table("department", "departments", "department", "학과", "개", 6, (
            _key(),
            _name(("Physics", "History", "Biology", "Music", "Law", "Economics", "Chemistry", "Art")),
            Column("building", "TEXT", "category", "building", "건물", ("North Hall", "South Hall", "Main Hall")),
            Column("budget", "INTEGER", "number", "budget", "예산", (100, 900)),
        )),
        Table("student", "students", "student", "학생", "명", 30, (
            _key(),
            _name(_PEOPLE),
            Column("age", "INTEGER", "number", "age", "나이", (18, 30)),
            Column("gpa", "REAL", "number", "gpa", "학점", (2.0, 4.5)),
            Column("city", "TEXT", "category", "city", "도시", _CITIES),
            Column("department_id", "INTEGER", "foreign", "department id", "학과 번호"),
        )),
        "department_id",
    ),
    Schema(
        "music",
        Table("artist", "artists", "artist", "가수", "명", 7, (
            _key(),
            _name(("Nova", "Blue Echo", "Mira", "The Owls", "Kai", "Lumen", "Red Sun", "Sora")),
            Column("country", "TEXT", "category", "country", "국가", _COUNTRIES),
            Column("debut_year", "INTEGER", "number", "debut year", "데뷔 연도", (1990, 2020)),
        )),
        Table("album", "albums", "album", "앨범", "장", 30, (
            _key(),
            Column("title", "TEXT", "label", "title", "제목", (
                "Blue Night", "First Light", "Echoes", "Paper Moon", "Gold Rush", "Wild Sea", "Quiet Room",
                "Neon Rain", "Open Road", "Still Water", "Red Line", "Glass Heart", "Long Way", "Snow Day",
                "Sun Dance", "Low Tide", "High Noon", "Slow Fire", "New Dawn", "Last Train")),
            Column("genre", "TEXT", "category", "genre", "장르", _GENRES),
            Column("year", "INTEGER", "number", "year", "연도", (1995, 2024)),
            Column("sales", "INTEGER", "number", "sales", "판매량", (1000, 90000)),
            Column("artist_id", "INTEGER", "foreign", "artist id", "가수 번호"),
        )),
        "artist_id",
    ),
    Schema(
        "shop",
        Table("store", "stores", "store", "매장", "곳", 6, (
            _key(),
            _name(("Corner Mart", "Green Grocer", "City Shop", "Daily Goods", "Star Market", "Fresh Box", "Top Store")),
            Column("city", "TEXT", "category", "city", "도시", _CITIES),
            Column("opened_year", "INTEGER", "number", "opened year", "개점 연도", (1980, 2022)),
        )),
        Table("product", "products", "product", "상품", "개", 30, (
            _key(),
            _name(("apple", "bread", "cheese", "coffee", "eggs", "honey", "juice", "milk", "pasta", "rice",
                   "salt", "soap", "sugar", "tea", "tofu", "water", "yogurt", "butter", "noodles", "jam")),
            Column("category", "TEXT", "category", "category", "분류", ("food", "drink", "household", "snack")),
            Column("price", "REAL", "number", "price", "가격", (1.0, 50.0)),
            Column("stock", "INTEGER", "number", "stock", "재고", (0, 200)),
            Column("store_id", "INTEGER", "foreign", "store id", "매장 번호"),
        )),
        "store_id",
    ),
    Schema(
        "library",
        Table("author", "authors", "author", "작가", "명", 7, (
            _key(),
            _name(("Han Kang", "Ana Ruiz", "Paul Moreau", "Emi Sato", "Luca Bianchi", "Sara Lind", "Tom Reed", "Ines Costa")),
            Column("country", "TEXT", "category", "country", "국가", _COUNTRIES),
            Column("birth_year", "INTEGER", "number", "birth year", "출생 연도", (1940, 1995)),
        )),
        Table("book", "books", "book", "책", "권", 30, (
            _key(),
            Column("title", "TEXT", "label", "title", "제목", (
                "The River", "Night Garden", "Small Things", "Iron Bridge", "Silent Hill", "Green Door",
                "Winter Road", "Salt Lake", "Broken Clock", "Deep Forest", "Old Harbor", "White Bird",
                "Empty Chair", "Lost City", "Stone Wall", "Warm Rain", "Dark Star", "Open Window",
                "Paper Boat", "Cold Fire")),
            Column("genre", "TEXT", "category", "genre", "장르", ("novel", "poetry", "history", "science", "essay")),
            Column("pages", "INTEGER", "number", "pages", "쪽수", (80, 900)),
            Column("year", "INTEGER", "number", "year", "연도", (1960, 2024)),
            Column("author_id", "INTEGER", "foreign", "author id", "작가 번호"),
        )),
        "author_id",
    ),
    Schema(
        "hospital",
        Table("doctor", "doctors", "doctor", "의사", "명", 6, (
            _key(),
            _name(("Dr. Kim", "Dr. Lee", "Dr. Park", "Dr. Smith", "Dr. Garcia", "Dr. Rossi", "Dr. Chen")),
            Column("specialty", "TEXT", "category", "specialty", "전문 분야", ("surgery", "cardiology", "pediatrics")),
            Column("salary", "INTEGER", "number", "salary", "급여", (5000, 20000)),
        )),
        Table("patient", "patients", "patient", "환자", "명", 30, (
            _key(),
            _name(_PEOPLE),
            Column("age", "INTEGER", "number", "age", "나이", (1, 95)),
            Column("city", "TEXT", "category", "city", "도시", _CITIES),
            Column("weight", "REAL", "number", "weight", "체중", (3.0, 120.0)),
            Column("doctor_id", "INTEGER", "foreign", "doctor id", "의사 번호"),
        )),
        "doctor_id",
    ),
    Schema(
        "travel",
        Table("airline", "airlines", "airline", "항공사", "곳", 6, (
            _key(),
            _name(("Sky Jet", "Blue Wings", "Aero Star", "Sun Air", "Polar Air", "Metro Fly")),
            Column("country", "TEXT", "category", "country", "국가", _COUNTRIES),
            Column("founded_year", "INTEGER", "number", "founded year", "설립 연도", (1930, 2015)),
        )),
        Table("flight", "flights", "flight", "항공편", "편", 30, (
            _key(),
            Column("code", "TEXT", "label", "code", "편명", tuple(f"F{n}" for n in range(100, 130))),
            Column("city", "TEXT", "category", "city", "도시", _CITIES),
            Column("distance", "INTEGER", "number", "distance", "거리", (200, 9000)),
            Column("price", "REAL", "number", "price", "가격", (50.0, 1500.0)),
            Column("airline_id", "INTEGER", "foreign", "airline id", "항공사 번호"),
        )),
        "airline_id",
    ),
)

TRAIN_SCHEMAS = ("school", "music", "shop", "library")
HELD_OUT_SCHEMAS = ("hospital", "travel")


def get_schema(name: str) -> Schema:
    """The embedded schema called ``name`` (one of :data:`TRAIN_SCHEMAS` + :data:`HELD_OUT_SCHEMAS`)."""
    for schema in SCHEMAS:
        if schema.name == name:
            return schema
    raise ValueError(f"get_schema: name must be one of {[s.name for s in SCHEMAS]}, got {name!r}")
