"""``llmkern kernels``: compile every Triton kernel configuration ahead of time and report its resources.

Each launcher module ``llmkern/backends/triton/<family>.py`` lists its default (and autotune)
configurations in ``aot_specs()`` (:class:`~llmkern.backends.triton._aot.AotSpec`). This tool
compiles each for the asked GPU architectures with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` — no GPU needed — and reads, per configuration:

* registers, spill stores/loads and stack frame from ``ptxas -v``, run through Triton's own
  ``make_cubin`` on the PTX it emitted, so the ``ptxas`` binary and flags are the ones Triton picks
  for that architecture and PTX version;
* shared memory: Triton's dynamic shared memory (``metadata.shared``) plus ptxas' static ``smem``,
  against the architecture's per-block limit;
* tensor-core instructions in the PTX: ``wgmma`` (Hopper warp-group MMA) or ``mma`` (``mma.sync``);
* an occupancy estimate: resident blocks per SM allowed by registers, shared memory and threads.

A configuration FAILs when it spills or exceeds shared memory; the command exits 1 when a default
configuration (not an autotune candidate, see ``AotSpec.autotune``) fails or any does not compile.
Results are cached in
``$XDG_CACHE_HOME/llmkern/kernels`` (default ``~/.cache``), keyed by Triton's version, the kernel's
source hash (``JITFunction.cache_key``), the configuration and the architecture.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}

# Per-architecture limits (CUDA programming guide, "Technical Specifications per Compute Capability"):
# max shared memory per block (with opt-in), shared memory per SM, registers per SM, threads and blocks per SM.
SMEM_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048}
BLOCKS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
WARP_SIZE = 32


@dataclass
class KernelReport:
    """One configuration compiled for one architecture."""

    family: str
    name: str
    arch: str
    num_warps: int
    num_stages: int
    autotune: bool = False  # an autotune candidate (True) or a default launch configuration
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    shared_limit: int | None = None
    tensor_cores: str = "-"
    blocks_per_sm: int | None = None
    status: str = "OK"  # OK | FAIL | ERROR
    note: str = ""

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


def _triton():
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("llmkern kernels compiles for real GPUs: unset TRITON_INTERPRET "
                           "(under it the kernels are interpreted functions that cannot be compiled)")
    return triton


def discover(families: list[str] | None = None) -> tuple[list[tuple[str, object]], list[str]]:
    """``([(family, AotSpec), ...], notes)`` for every module of ``llmkern.backends.triton`` (or those named)."""
    import llmkern.backends.triton as pkg

    specs, notes = [], []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or (families and info.name not in families):
            continue
        try:
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as exc:
            notes.append(f"{info.name}: the module does not import: {type(exc).__name__}: {exc}")
            continue
        if not hasattr(module, "aot_specs"):
            notes.append(f"{info.name}: llmkern/backends/triton/{info.name}.py has no aot_specs(); "
                         f"its kernels are not reported")
            continue
        try:
            found = list(module.aot_specs())
        except Exception as exc:
            notes.append(f"{info.name}: aot_specs() failed: {type(exc).__name__}: {exc}")
            continue
        if not found:
            notes.append(f"{info.name}: aot_specs() returned no configurations")
        specs += [(info.name, spec) for spec in found]
    if families:
        known = {f for f, _ in specs} | {n.split(":")[0] for n in notes}
        notes += [f"{f}: no module llmkern/backends/triton/{f}.py" for f in families if f not in known]
    return specs, notes


def jit_function(fn):
    """The ``@triton.jit`` function under ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"not a @triton.jit function: {fn!r}")
    return fn


def _full_signature(spec) -> tuple[dict, dict]:
    """Triton's signature (constexprs included, in argument order) and the constexpr values, defaults filled in."""
    fn = jit_function(spec.fn)
    signature, constants = {}, dict(spec.constants)
    for param in fn.params:
        name = param.name
        if name in spec.signature:
            signature[name] = spec.signature[name]
            continue
        if name not in constants:
            default = param.default
            if default is inspect.Parameter.empty:
                raise ValueError(f"AotSpec {spec.name!r}: argument {name!r} of {fn.__name__} is neither in "
                                 f"signature nor in constants")
            constants[name] = default
        signature[name] = "constexpr"
    unknown = (set(spec.signature) | set(spec.constants)) - {p.name for p in fn.params}
    if unknown:
        raise ValueError(f"AotSpec {spec.name!r}: {sorted(unknown)} are not arguments of {fn.__name__}")
    return signature, constants


def _cache_key(spec, cc: int) -> str:
    triton = _triton()
    signature, constants = _full_signature(spec)
    constants = sorted((k, repr(v)) for k, v in constants.items())
    text = json.dumps([triton.__version__, jit_function(spec.fn).cache_key, signature, constants,
                       spec.num_warps, spec.num_stages, cc])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llmkern" / "kernels"


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spills": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    """Registers (max over functions), stack/spill bytes and static shared memory (sums) from ``ptxas -v``."""
    regs = [int(m) for m in _PTXAS["registers"].findall(log)]
    spills = [tuple(map(int, m)) for m in _PTXAS["spills"].findall(log)]
    if not regs:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    return {
        "registers": max(regs),
        "stack": sum(s[0] for s in spills),
        "spill_stores": sum(s[1] for s in spills),
        "spill_loads": sum(s[2] for s in spills),
        "static_smem": sum(int(m) for m in _PTXAS["smem"].findall(log)),
    }


def tensor_core_use(ptx: str) -> str:
    """``"wgmma"`` (Hopper warp-group MMA), ``"mma"`` (``mma.sync``) or ``"-"``: what the PTX uses."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "-"


def blocks_per_sm(cc: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256), shared memory,
    threads and the block limit."""
    threads = num_warps * WARP_SIZE
    regs_per_warp = -(-registers * WARP_SIZE // 256) * 256
    limits = [REGS_PER_SM // (regs_per_warp * num_warps), THREADS_PER_SM[cc] // threads, BLOCKS_PER_SM[cc]]
    if shared:
        limits.append(SMEM_PER_SM[cc] // shared)
    return max(0, min(limits))


@contextlib.contextmanager
def _ptxas_log_captured(triton):
    """Capture the ``ptxas -v`` log that Triton prints when ``knobs.nvidia.dump_ptxas_log`` is on."""
    knobs = triton.knobs.nvidia
    old = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield out
    finally:
        knobs.dump_ptxas_log = old


def _compile(triton, spec, cc: int) -> tuple[object, str]:
    """``triton.compile`` the spec for ``cc``; returns the compiled kernel and Triton's ``ptxas -v`` log.

    The log comes from Triton's own PTX -> cubin step (its ptxas binary, its flags). When the kernel
    came from Triton's cache no ptxas ran, so that step is run again on the cached PTX.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    signature, constants = _full_signature(spec)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    target = GPUTarget("cuda", cc, WARP_SIZE)
    with _ptxas_log_captured(triton) as log, warnings.catch_warnings():
        # Triton 3.9 warns that its fp-fusion default will change; the report compiles with the default.
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        # Pointers are 16-byte aligned, as torch's allocations are and as Triton specializes them at launch.
        attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
        compiled = triton.compile(ASTSource(jit_function(spec.fn), signature, constexprs=constants, attrs=attrs),
                                  target=target, options=options)
        if "registers" not in log.getvalue():
            backend = make_backend(target)
            backend.make_cubin(compiled.asm["ptx"], {}, backend.parse_options(options), cc)
    return compiled, log.getvalue()


def compile_spec(family: str, spec, arch: str, use_cache: bool = True) -> KernelReport:
    """Compile ``spec`` for ``arch`` (``"sm_90"``) and measure it; errors become an ERROR report.

    ``use_cache``: return the cached report when there is one (a fresh report is always cached).
    """
    cc = ARCHS[arch]
    report = KernelReport(family, spec.name, arch, spec.num_warps, spec.num_stages, spec.autotune,
                          shared_limit=SMEM_PER_BLOCK[cc])
    try:
        triton = _triton()
        cached = cached_report(family, spec, arch) if use_cache else None
        if cached is not None:
            return cached
        compiled, log = _compile(triton, spec, cc)
        ptx = compiled.asm["ptx"]
        stats = parse_ptxas(log)
    except Exception as exc:  # one configuration failing to compile is a row of the report, not the end of it
        report.status = "ERROR"
        report.note = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        return report
    report.registers = stats["registers"]
    report.stack, report.spill_stores, report.spill_loads = stats["stack"], stats["spill_stores"], stats["spill_loads"]
    report.shared = int(compiled.metadata.shared) + stats["static_smem"]
    report.tensor_cores = tensor_core_use(ptx)
    report.blocks_per_sm = blocks_per_sm(cc, report.registers, report.shared, spec.num_warps)
    problems = []
    if report.spills:
        problems.append(f"spills {report.spill_stores} B stores / {report.spill_loads} B loads")
    if report.shared > report.shared_limit:
        problems.append(f"shared memory {report.shared} B > {report.shared_limit} B")
    if report.blocks_per_sm == 0:
        problems.append("no block fits on an SM")
    if problems:
        report.status, report.note = "FAIL", "; ".join(problems)
    path = cache_dir() / f"{_cache_key(spec, cc)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(report)))
    tmp.replace(path)
    return report


def cached_report(family: str, spec, arch: str) -> KernelReport | None:
    """The cached report of ``spec`` on ``arch``, or None."""
    path = cache_dir() / f"{_cache_key(spec, ARCHS[arch])}.json"
    if not path.is_file():
        return None
    return KernelReport(**{**json.loads(path.read_text()), "family": family, "name": spec.name,
                           "autotune": spec.autotune})


_WORKER_SPECS: dict[str, list] | None = None


def _worker_compile(task: tuple[str, int, str]) -> KernelReport:
    """Process-pool task: compile the ``index``-th spec of ``family`` (specs re-discovered once per worker)."""
    global _WORKER_SPECS
    family, index, arch = task
    if _WORKER_SPECS is None:
        _WORKER_SPECS = {}
        for fam, spec in discover()[0]:
            _WORKER_SPECS.setdefault(fam, []).append(spec)
    return compile_spec(family, _WORKER_SPECS[family][index], arch, use_cache=False)


def report_all(archs: list[str], families: list[str] | None = None, use_cache: bool = True, jobs: int = 1,
               progress=None) -> tuple[list[KernelReport], list[str]]:
    """Compile every spec of every family for every arch, ``jobs`` compilations at a time.

    Cached reports are used unless ``use_cache`` is False. ``progress(report)`` is called after each.
    """
    _triton()
    specs, notes = discover(families)
    index_in_family: dict[str, int] = {}
    tasks, reports = [], []
    for family, spec in specs:
        index = index_in_family.get(family, 0)
        index_in_family[family] = index + 1
        for arch in archs:
            hit = cached_report(family, spec, arch) if use_cache else None
            reports.append(hit)
            if hit is None:
                tasks.append((len(reports) - 1, (family, index, arch), spec))
            elif progress is not None:
                progress(hit)
    if jobs > 1 and len(tasks) > 1:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context) as pool:
            for (slot, _, _), report in zip(tasks, pool.map(_worker_compile, [t for _, t, _ in tasks])):
                reports[slot] = report
                if progress is not None:
                    progress(report)
    else:
        for slot, (family, _, arch), spec in tasks:
            reports[slot] = compile_spec(family, spec, arch, use_cache=False)
            if progress is not None:
                progress(reports[slot])
    return reports, notes


HEADER = ("family", "kernel", "config", "arch", "warps", "stages", "regs", "spill B", "smem B", "smem limit",
          "TC", "blocks/SM", "result")


def _cells(r: KernelReport) -> tuple[str, ...]:
    show = lambda v: "-" if v is None else str(v)
    spill = None if r.spill_stores is None else r.spills
    return (r.family, r.name, "autotune" if r.autotune else "default", r.arch, str(r.num_warps),
            str(r.num_stages), show(r.registers), show(spill),
            show(r.shared), show(r.shared_limit), r.tensor_cores, show(r.blocks_per_sm), r.status)


def format_report(reports: list[KernelReport], notes: list[str]) -> str:
    from llmkern.tools.check import format_table

    out = [format_table([_cells(r) for r in reports], HEADER)]
    flagged = [r for r in reports if r.status != "OK"]
    if flagged:
        out.append("")
        out += [f"{r.status}: {r.family} {r.name} {r.arch}: {r.note}" for r in flagged]
    out += [f"note: {n}" for n in notes]
    counts = {s: sum(r.status == s for r in reports) for s in ("OK", "FAIL", "ERROR")}
    default_fail = sum(r.status != "OK" for r in reports if not r.autotune)
    n_auto = sum(r.autotune for r in reports)
    out.append(f"{len(reports)} configurations ({len(reports) - n_auto} default, {n_auto} autotune): "
               + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {default_fail} default configurations fail")
    return "\n".join(out)


def failing_defaults(reports: list[KernelReport]) -> list[KernelReport]:
    """Default (non-autotune) configurations that spill, overflow shared memory, or do not compile."""
    return [r for r in reports if not r.autotune and r.status != "OK"]


def add_arguments(parser) -> None:
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=tuple(ARCHS),
                        help="target architectures (default: sm_80 sm_90)")
    parser.add_argument("--family", nargs="+", help="only these families (module names of llmkern/backends/triton)")
    parser.add_argument("--no-cache", action="store_true", help="recompile instead of reading cached reports")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compilations in parallel (default: the CPU count)")
    parser.add_argument("--json", metavar="FILE", help="also write the reports to FILE")


def run(args) -> int:
    try:
        triton = _triton()
    except (ImportError, RuntimeError) as exc:
        print(f"llmkern kernels: {exc}")
        return 2
    done = []

    def progress(report: KernelReport) -> None:  # compiling everything cold takes minutes: show it moves
        done.append(report)
        if sys.stderr.isatty():
            print(f"\r{len(done)} configurations", end="", file=sys.stderr, flush=True)

    reports, notes = report_all(args.arch, args.family, use_cache=not args.no_cache, jobs=args.jobs,
                                progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(format_report(reports, notes))
    if args.json:
        from llmkern.tools.machine import machine

        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "triton": triton.__version__, "archs": args.arch,
                       "kernels": [asdict(r) for r in reports], "notes": notes}, f, indent=1)
    return 1 if failing_defaults(reports) or any(r.status == "ERROR" for r in reports) else 0
