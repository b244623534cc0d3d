"""``llmkern bench``: run the pytest-benchmark files of ``bench/`` and summarise them as speed ratios.

The measurements are pytest-benchmark's (``python -m pytest bench/ --benchmark-only
--benchmark-json=...``, run in a subprocess); this module only groups them. Every benchmark is
parametrized by ``provider`` (see ``bench/conftest.py``); the cases of one benchmark function that
differ only in ``provider`` are compared, and each peer's row reads ``speedup = peer median /
llmkern median`` (above 1: llmkern is faster). The table, a JSON file (the rows, the machine, and
pytest-benchmark's raw output) and a bar chart record the machine and the date.

The benchmark files live in the source tree (``bench/``), not in the installed package: run from a
checkout (an editable install finds it), or point ``--bench-dir`` at one; ``--from-json`` summarises
an existing ``--benchmark-json`` file without running anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llmkern.tools.check import format_table

LLMKERN = "llmkern"
THROUGHPUT_KEYS = ("TFLOP/s", "GB/s")


@dataclass
class Ratio:
    """llmkern against one peer on one case."""

    bench: str  # benchmark function, e.g. "test_norm"
    case: str  # the other parameters, e.g. "kind=rms_norm shape=8192x4096 dtype=bf16 mode=fwd"
    peer: str
    llmkern_s: float  # median seconds
    peer_s: float
    speedup: float  # peer_s / llmkern_s
    throughput: str  # llmkern's GB/s or TFLOP/s, e.g. "812.3 GB/s", or ""
    llmkern_peak_mb: float | None = None
    peer_peak_mb: float | None = None


def find_bench_dir(explicit: str | None = None) -> Path:
    """``--bench-dir``, else ``bench/`` beside the imported llmkern package (a checkout or an editable
    install), else ``./bench``. Raises ``FileNotFoundError`` saying how to get one."""
    import llmkern

    candidates = [Path(explicit)] if explicit else [Path(llmkern.__file__).resolve().parents[1] / "bench",
                                                    Path.cwd() / "bench"]
    for path in candidates:
        if path.is_dir() and any(path.glob("bench_*.py")):
            return path
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no bench_*.py files in {where}. The benchmarks are pytest-benchmark files in bench/ of llmkern's "
        f"source tree, which a wheel install does not contain: run from a checkout (pip install -e .) "
        f"or pass --bench-dir PATH/TO/bench")


def pytest_command(bench_dir: Path, json_path: Path, quick: bool, select: str | None,
                   extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "--benchmark-only", f"--benchmark-json={json_path}",
           "--benchmark-columns=median,iqr,rounds",
           "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"]
    if quick:
        cmd.append("--quick")
    if select:
        cmd += ["-k", select]
    return cmd + extra


def _label(value) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def _throughput(extra: dict) -> str:
    for key in THROUGHPUT_KEYS:
        if isinstance(extra.get(key), (int, float)):
            return f"{extra[key]:.3g} {key}"
    return ""


def ratios(data: dict) -> list[Ratio]:
    """The llmkern-vs-peer rows of a pytest-benchmark JSON document."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for bench in data.get("benchmarks", []):
        params = dict(bench.get("params") or {})
        provider = params.pop("provider", None)
        if provider is None:
            continue
        function = bench["name"].split("[")[0]
        module = bench.get("fullname", "").split("::")[0]
        name = f"{Path(module).stem}::{function}" if module else function
        case = " ".join(f"{k}={_label(v)}" for k, v in params.items())
        groups.setdefault((name, case), {})[str(provider)] = bench
    rows = []
    for (name, case), by_provider in groups.items():
        ours = by_provider.get(LLMKERN)
        if ours is None:
            continue
        ours_s = ours["stats"]["median"]
        for peer, theirs in by_provider.items():
            if peer == LLMKERN:
                continue
            peer_s = theirs["stats"]["median"]
            rows.append(Ratio(name, case, peer, ours_s, peer_s, peer_s / ours_s,
                              _throughput(ours.get("extra_info", {})),
                              ours.get("extra_info", {}).get("peak_memory_MB"),
                              theirs.get("extra_info", {}).get("peak_memory_MB")))
    return rows


def machine_line(data: dict) -> str:
    info = data.get("machine_info", {})
    device = info.get("device") or info.get("cpu", {}).get("brand_raw") or info.get("processor") or "unknown machine"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton") if info.get(k))
    date = (data.get("datetime") or "")[:10]
    return f"{device}; {versions}; {date}".strip("; ")


HEADER = ("benchmark", "case", "llmkern", "throughput", "peer", "peer time", "speedup")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def format_ratios(rows: list[Ratio]) -> str:
    return format_table([(r.bench, r.case, _ms(r.llmkern_s), r.throughput, r.peer, _ms(r.peer_s),
                          f"{r.speedup:.2f}x") for r in rows], HEADER)


def plot(rows: list[Ratio], path: str, title: str) -> None:
    """Horizontal bars of llmkern's speedup over each peer (log scale; 1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = sorted({r.peer for r in rows})
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(peers)}
    labels = [f"{r.bench.split('::')[-1]} {r.case}  vs {r.peer}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, 1.5 + 0.28 * len(rows)))
    ax.barh(range(len(rows)), [r.speedup for r in rows], color=[colors[r.peer] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of llmkern over the peer (peer time / llmkern time; > 1: llmkern faster)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in peers]
    ax.legend(handles, peers, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="peer")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summarise(data: dict, json_out: str | None = None, plot_out: str | None = None) -> list[Ratio]:
    """Print the ratio table of a pytest-benchmark document; write the JSON and the chart if asked."""
    rows = ratios(data)
    where = machine_line(data)
    print(f"llmkern bench: {len(data.get('benchmarks', []))} measurements on {where}")
    print(format_ratios(rows) if rows else "no case has both llmkern and a peer measured")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": where, "machine_info": data.get("machine_info", {}),
                       "datetime": data.get("datetime"), "ratios": [asdict(r) for r in rows],
                       "pytest_benchmark": data}, f, indent=1)
    if plot_out and rows:
        plot(rows, plot_out, f"llmkern speedups — {where}")
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one representative case per benchmark (every provider and mode)")
    parser.add_argument("--json", metavar="FILE", help="write the ratios, the machine and the raw measurements")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speedups")
    parser.add_argument("-k", dest="select", metavar="EXPR", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--bench-dir", help="the bench/ directory of an llmkern checkout")
    parser.add_argument("--from-json", metavar="FILE",
                        help="summarise this JSON (pytest-benchmark's, or one this command wrote) instead of running")
    parser.add_argument("pytest_args", nargs="*", help="further pytest arguments (after --)")


def run(args) -> int:
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        summarise(data.get("pytest_benchmark", data), args.json, args.plot)
        return 0
    try:
        bench_dir = find_bench_dir(args.bench_dir)
    except FileNotFoundError as exc:
        print(f"llmkern bench: {exc}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "pytest-benchmark.json"
        cmd = pytest_command(bench_dir, raw, args.quick, args.select, args.pytest_args)
        print("+ " + " ".join(cmd), flush=True)
        status = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if not raw.is_file():
            print(f"llmkern bench: pytest exited with {status} and wrote no measurements")
            return status or 1
        data = json.loads(raw.read_text())
    summarise(data, args.json, args.plot)
    if status != 0:
        print(f"llmkern bench: pytest exited with {status}: some benchmarks failed or none ran (see above)")
    return 0 if status == 0 else 1
