"""``llmkern check``: every op, forward and backward, on standard and odd shapes, against the reference.

For each backend (reference, cpu, triton), op, shape and dtype it prints one row per output and per
gradient: max abs error, max rel error, the tolerance and PASS/FAIL, by the rule of
:mod:`llmkern.tools.numerics` (floating ops) or bit-exactness (quantization codes and scales); then
the quantization error of NF4 against the int8 schemes on normal weights. Exit status 1 when any row
FAILs or ERRORs.

Each call runs with ``LLMKERN_STRICT=1``, so a silent fallback to another backend shows as a
FALLBACK row instead of a PASS earned by the reference.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import asdict, dataclass

import torch

import llmkern
from llmkern import backends
from llmkern.tools import cases as case_lib
from llmkern.tools.cases import ExactCase, KernelCase, shape_label
from llmkern.tools.machine import machine
from llmkern.tools.numerics import exact_verdict, kernel_verdict

FAILING = ("FAIL", "ERROR")
STATUSES = ("PASS", "FAIL", "ERROR", "FALLBACK", "SKIP")


@dataclass
class Row:
    """One line of the table."""

    op: str
    mode: str  # "fwd", "fwd:<output>", "bwd:d<input>", or an exact output's name
    shape: str
    dtype: str
    backend: str
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None  # None: bit-exact
    status: str = "PASS"
    note: str = ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def backend_device(name: str) -> tuple[torch.device | None, str]:
    """The device a backend is checked on here, or None and the reason it cannot run."""
    if name == "triton":
        if torch.cuda.is_available():
            return torch.device("cuda"), ""
        if backends.TRITON_INTERPRET:
            return torch.device("cpu"), ""
        return None, "no CUDA GPU; set TRITON_INTERPRET=1 before starting to run the Triton kernels in the interpreter"
    return torch.device("cpu"), ""


def available_backends() -> list[str]:
    return [b for b in ("reference", "cpu", "triton") if backend_device(b)[0] is not None]


@contextlib.contextmanager
def _strict():
    old = os.environ.get("LLMKERN_STRICT")
    os.environ["LLMKERN_STRICT"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LLMKERN_STRICT"]
        else:
            os.environ["LLMKERN_STRICT"] = old


def _is_fallback(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "LLMKERN_STRICT=1 forbids fallbacks" in str(exc)


def _error_row(base: dict, mode: str, exc: BaseException) -> Row:
    status = "FALLBACK" if _is_fallback(exc) else "ERROR"
    message = " ".join(f"{type(exc).__name__}: {exc}".split())
    return Row(mode=mode, status=status, note=message[:300], **base)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _prepared(args: dict, grads: tuple[str, ...], dtype: torch.dtype | None = None) -> dict:
    """Detached copies of the inputs (floating tensors cast to ``dtype`` if given), grads enabled as asked."""
    out = {}
    for key, value in args.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            value = value.clone().requires_grad_(key in grads)
        out[key] = value
    return out


def _evaluate(fn, args: dict, grads: tuple[str, ...], grad_outputs: list | None):
    """Outputs of ``fn(**args)`` and, given ``grad_outputs``, the gradients of the ``grads`` inputs."""
    outs = _as_tuple(fn(**args))
    if grad_outputs is None:
        return outs, ()
    return outs, _backward(outs, args, grads, grad_outputs)


def _backward(outs, args: dict, grads: tuple[str, ...], grad_outputs: list) -> tuple:
    gouts = [g.to(o.dtype) for g, o in zip(grad_outputs, outs)]
    return torch.autograd.grad(outs, [args[name] for name in grads], grad_outputs=gouts, allow_unused=True)


def _verdict_row(base: dict, mode: str, got, want, baseline) -> Row:
    if got is None or want is None:
        return Row(mode=mode, status="ERROR", note="no gradient was computed", **base)
    try:
        verdict = kernel_verdict(got.detach(), want.detach(), baseline.detach())
    except ValueError as exc:  # shape mismatch
        return Row(mode=mode, status="ERROR", note=str(exc), **base)
    return Row(mode=mode, max_abs=verdict.max_abs, max_rel=verdict.max_rel, tolerance=verdict.bound,
               status="PASS" if verdict.ok else "FAIL", **base)


def _run_kernel_case(case: KernelCase, backend: str, device: torch.device, dtype: torch.dtype,
                     shape: dict) -> list[Row]:
    base = dict(op=case.op, shape=shape_label(shape), dtype=_dtype_name(dtype), backend=backend)
    fwd_modes = [("fwd" if len(case.outputs) == 1 else f"fwd:{name}") for name in case.outputs]
    torch.manual_seed(0)
    args = case.inputs(dtype, device, **shape)
    kernel_args = _prepared(args, case.grads)
    try:
        with llmkern.use_backend(backend), _strict():
            outs = _as_tuple(case.llmkern(**kernel_args))
    except Exception as exc:  # reported as a row: the table must show every op, whatever happens
        return [_error_row(base, "fwd", exc)]
    grad_outputs = [torch.randn_like(o) for o in outs] if case.grads else None
    try:
        ref_outs, ref_grads = _evaluate(case.torch, _prepared(args, case.grads, torch.float64), case.grads,
                                        grad_outputs)
        base_outs, base_grads = _evaluate(case.torch, _prepared(args, case.grads), case.grads, grad_outputs)
    except Exception as exc:  # PyTorch itself cannot compute this case here: nothing to compare against
        row = _error_row(base, "fwd", exc)
        row.note = f"the PyTorch computation failed: {row.note}"
        return [row]
    rows = [_verdict_row(base, mode, *t) for mode, *t in zip(fwd_modes, outs, ref_outs, base_outs)]
    if not case.grads:
        return rows
    try:
        with llmkern.use_backend(backend), _strict():
            grads = _backward(outs, kernel_args, case.grads, grad_outputs)
    except Exception as exc:
        return rows + [_error_row(base, "bwd", exc)]
    return rows + [_verdict_row(base, f"bwd:d{name}", *t)
                   for name, *t in zip(case.grads, grads, ref_grads, base_grads)]


def _run_exact_case(case: ExactCase, backend: str, device: torch.device, dtype: torch.dtype,
                    shape: dict) -> list[Row]:
    base = dict(op=case.op, shape=shape_label(shape), dtype=_dtype_name(dtype), backend=backend)
    torch.manual_seed(0)
    args = case.inputs(dtype, device, **shape)
    want = case.expected(**args) if case.expected is not None else None
    source = "the independent implementation"
    if want is None:
        if backend == "reference":
            return [Row(mode="all", status="SKIP", note="no independent implementation for this input; the other "
                                                        "backends are checked bit for bit against this one", **base)]
        with llmkern.use_backend("reference"):
            want = case.llmkern(**args)
        source = "the reference backend"
    try:
        with llmkern.use_backend(backend), _strict():
            got = case.llmkern(**args)
    except Exception as exc:
        return [_error_row(base, "all", exc)]
    rows = []
    for name, expected in want.items():
        verdict = exact_verdict(got[name], expected)
        rows.append(Row(mode=name, max_abs=verdict.max_abs, max_rel=verdict.max_rel, tolerance=None,
                        status="PASS" if verdict.ok else "FAIL",
                        note="" if verdict.ok else f"differs from {source}", **base))
    return rows


def _implemented(case, backend: str, device: torch.device) -> str:
    """'' if ``backend`` runs ``case.dispatch`` on ``device``, else why not."""
    with llmkern.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = backends.resolve(case.dispatch, device)
    if resolved != backend:
        return f"no {backend} implementation of {case.dispatch}"
    return ""


def run_case(case, backend: str, device: torch.device, shapes=None, dtypes=None) -> list[Row]:
    """All rows of one case on one backend (every shape and dtype, or the ones given)."""
    rows = []
    try:
        reason = _implemented(case, backend, device)
    except Exception as exc:  # e.g. the C++ extension cannot be built, or the backend module fails to import
        return [_error_row(dict(op=case.op, shape="-", dtype="-", backend=backend), "-", exc)]
    if reason:
        return [Row(op=case.op, mode="-", shape="-", dtype="-", backend=backend, status="SKIP", note=reason)]
    interpreted = backend == "triton" and device.type == "cpu"
    runner = _run_kernel_case if isinstance(case, KernelCase) else _run_exact_case
    for shape in shapes if shapes is not None else case.shapes:
        for dtype in dtypes if dtypes is not None else case.dtypes:
            if dtype not in case.dtypes:
                continue
            if interpreted and case.dot and dtype == torch.bfloat16:
                continue
            rows += runner(case, backend, device, dtype, shape)
    return rows


@dataclass
class Report:
    rows: list[Row]
    quantization: list[dict]
    notes: list[str]

    @property
    def failed(self) -> bool:
        return any(r.status in FAILING for r in self.rows)


def run_checks(backend_names: list[str], family_names: list[str] | None = None, ops: list[str] | None = None,
               dtypes: list[torch.dtype] | None = None, quick: bool = False, quantization: bool = True) -> Report:
    """Check the ops of the given families (all by default) on the given backends.

    ops: only these op names; dtypes: only these; quick: only the first two shapes of each case (the
    first standard and the first odd one); quantization: also compute the quantization-error table.
    """
    rows, notes, quant = [], [], []
    fams = case_lib.families(family_names)
    for name in backend_names:
        device, why = backend_device(name)
        if device is None:
            notes.append(f"backend {name}: not checked: {why}")
            continue
        if name == "triton" and device.type == "cpu":
            notes.append("backend triton runs in the Triton interpreter; bf16 is not run for tl.dot kernels there")
        for fam in fams:
            for case in fam.cases:
                if ops and case.op not in ops:
                    continue
                shapes = case.shapes[:2] if quick else None
                rows += run_case(case, name, device, shapes, dtypes)
    if quantization:
        for fam in fams:
            if hasattr(fam.module, "quantization_error"):
                quant += fam.module.quantization_error(torch.device("cpu"))
    return Report(rows, quant, notes)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


HEADER = ("op", "mode", "shape", "dtype", "backend", "max abs err", "max rel err", "tolerance", "result")


def _cells(row: Row) -> tuple[str, ...]:
    if row.tolerance is None:
        tol = "exact" if row.max_abs is not None else "-"
    else:
        tol = _fmt(row.tolerance)
    return (row.op, row.mode, row.shape, row.dtype, row.backend, _fmt(row.max_abs), _fmt(row.max_rel), tol,
            row.status)


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


QUANT_HEADER = ("scheme", "blocksize", "bits/param", "rmse/std", "max err/std", "SQNR dB")


def format_quantization(rows: list[dict]) -> str:
    return format_table([(r["scheme"], str(r["blocksize"]), f"{r['bits_per_param']:.3f}", f"{r['rmse_rel']:.4f}",
                          f"{r['max_abs_rel']:.4f}", f"{r['sqnr_db']:.1f}") for r in rows], QUANT_HEADER)


SUMMARY_HEADER = ("op", "backend", "rows", "pass", "fail", "other", "worst err/tol")


def summary_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    """One line per (op, backend): counts, and the largest error as a fraction of its tolerance."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.backend), []).append(r)
    lines = []
    for (op, backend), group in groups.items():
        ratios = [r.max_abs / r.tolerance for r in group if r.tolerance and r.max_abs is not None]
        exact = [r for r in group if r.tolerance is None and r.max_abs is not None]
        worst = f"{max(ratios):.2f}" if ratios else ("exact" if exact else "-")
        fail = sum(r.status in FAILING for r in group)
        passed = sum(r.status == "PASS" for r in group)
        lines.append((op, backend, str(len(group)), str(passed), str(fail), str(len(group) - passed - fail), worst))
    return lines


def format_report(report: Report) -> str:
    out = [format_table([_cells(r) for r in report.rows], HEADER)]
    out += ["", "Summary (worst err/tol: the largest error as a fraction of its tolerance; exact: bit-identical):",
            format_table(summary_rows(report.rows), SUMMARY_HEADER)]
    failed = [r for r in report.rows if r.note and r.status in FAILING + ("FALLBACK",)]
    if failed:
        out.append("")
        out += [f"{r.status}: {r.op} {r.mode} [{r.shape} {r.dtype} {r.backend}]: {r.note}" for r in failed]
    skipped: dict[tuple[str, str, str], int] = {}
    for r in report.rows:
        if r.status == "SKIP":
            key = (r.op, r.backend, r.note)
            skipped[key] = skipped.get(key, 0) + 1
    if skipped:
        out.append("")
        out += [f"SKIP: {op} on {backend} ({n} rows): {note}" for (op, backend, note), n in skipped.items()]
    if report.quantization:
        out += ["", "Quantization error on N(0, 1) weights (reference backend):",
                format_quantization(report.quantization)]
    if report.notes:
        out += [""] + [f"note: {n}" for n in report.notes]
    counts = {s: sum(r.status == s for r in report.rows) for s in STATUSES}
    out += ["", " ".join(f"{n} {s}" for s, n in counts.items() if n) or "no rows"]
    return "\n".join(out)


def add_arguments(parser) -> None:
    parser.add_argument("--backend", nargs="+", choices=("reference", "cpu", "triton"),
                        help="backends to check (default: every one that runs here)")
    parser.add_argument("--family", nargs="+", choices=tuple(case_lib.FAMILIES), help="only these op families")
    parser.add_argument("--op", nargs="+", help="only these ops (e.g. rms_norm scaled_dot_product_attention)")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"), help="only these dtypes")
    parser.add_argument("--quick", action="store_true", help="only the first standard and the first odd shape")
    parser.add_argument("--no-quantization", action="store_true", help="skip the quantization-error table")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the machine to FILE")


def run(args) -> int:
    names = args.backend or available_backends()
    for name in names:
        device, why = backend_device(name)
        if device is None:
            print(f"llmkern check: backend {name} cannot run here: {why}")
            return 2
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    report = run_checks(names, args.family, args.op, dtypes, args.quick, not args.no_quantization)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": [asdict(r) for r in report.rows],
                       "quantization": report.quantization, "notes": report.notes}, f, indent=1)
    return 1 if report.failed else 0
