"""The compile gate: every kernel x every configuration the launchers can choose, compiled for real GPU
targets on a machine without a GPU, and what the compiler produced checked against the hardware's limits.
With a quantized base (``Case.quantize``: NF4, NF4 with double quantization, int8) each (precision, M, N, K,
rank) case also runs the launchers of :mod:`lora_kernels.ops.quantized` (W frozen, bias on, dropout or not):
the in-loop GEMMs, or above ``configs.DEQUANT_ONCE``'s crossover (NF4 on sm90) the dequantize kernel and the
16-bit kernels, as the launchers choose on that arch.
The segmented many-adapter kernels (:mod:`lora_kernels.ops.segmented`, :func:`segmented_cases`) run their six
primitives on a plan of 64 batch rows over a pool of 64 slots. Each case has a kind (``KINDS``: lora,
quantized, dora, segmented); ``python -m lora_kernels.check --aot --only KIND ...`` sweeps those kinds only.

:func:`sweep` calls the public launchers (``forward``, ``backward``, ``dropout_mask``) under
:func:`~lora_kernels.ops.standin.stand_in_gpu` (compile-only) over a grid of cases: precision (IEEE fp32,
TF32, fp16, bf16) x M (decode 1/17/64, prefill 512, training 8192) x N = K in {512, 768, 4096} (``full``:
every (N, K) pair) x rank (1, 8, 16, 32, 64, 100: every rank-block bucket and both sides of the
divisible-by-16 specialisation) x bias x dropout x trainable W, plus (``full``) every candidate tile of the
GEMM autotuner
(:func:`lora_kernels.ops.configs.autotune_candidates`). Triton keys its compiled kernels by specialisation,
so the thousands of cases compile a few hundred distinct kernels per arch; each is then read once:

* ``ptxas -v``: registers per thread, spill stores/loads (bytes);
* the kernel's metadata: shared memory requested at launch (Triton's dynamic allocation), warps, stages;
* its SASS (``cuobjdump -sass``): the MMA form (``HGMMA`` = Hopper warpgroup MMA, ``HMMA`` = warp-level
  tensor-core MMA, none = CUDA cores), cp.async copies (``LDGSTS``) and the widest global loads.

Failures (:func:`verdicts`): a compile error; shared memory above the arch's opt-in limit in a default
configuration; any register spill in a default configuration; on sm90, an fp16/bf16 forward, dX or
dY-pass kernel with BLOCK_M >= 64 (wgmma's M per warpgroup) whose SASS has no HGMMA. Autotune candidates
only fail on compile errors: the autotuner skips one that does not fit (``OutOfResources``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from . import configs as _configs
from .standin import GPUS, stand_in_gpu

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
M_SIZES = (1, 17, 64, 512, 8192)
WIDTHS = (512, 768, 4096)
RANKS = (1, 8, 16, 32, 64, 100)  # 128 and 256 compile the kernels of 64 (same rank block and specialisation)
GEMM_ROLES = ("forward", "dX", "dY")  # the sm90 fp16/bf16 kernels that must use wgmma


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of forward + backward the launchers can see."""

    precision: str
    m: int
    n: int
    k: int
    rank: int
    bias: bool
    dropout: bool
    train_w: bool
    autotune: Optional[int] = None  # index into autotune_candidates(default tile) of each GEMM
    quantize: Optional[str] = None  # one of QUANTIZED: the kernels of lora_kernels.ops.quantized
    dora: bool = False  # the DoRA launchers (lora_kernels.ops.dora): forward with Z, backward with dc, weight norm
    # the six segmented primitives (lora_kernels.ops.segmented) over batch rows of this many tokens (M = rows x
    # tokens; rank is the plan's rank bound); 0: not a segmented case
    segment_tokens: int = 0

    @property
    def kind(self) -> str:
        """Which launchers the case runs: one of KINDS (``check --aot --only`` filters on it)."""
        if self.segment_tokens:
            return "segmented"
        return "dora" if self.dora else ("quantized" if self.quantize else "lora")

    def __str__(self) -> str:
        text = (f"{self.precision} M={self.m} N={self.n} K={self.k} r={self.rank}"
                f"{' bias' if self.bias else ''}{' dropout' if self.dropout else ''}{' dW' if self.train_w else ''}")
        text += f" {self.quantize}" if self.quantize else ""
        text += " dora" if self.dora else ""
        if self.segment_tokens:
            text += f" segmented {self.m // self.segment_tokens}x{self.segment_tokens}"
        return text + (f" autotune#{self.autotune}" if self.autotune is not None else "")


KINDS = ("lora", "quantized", "dora", "segmented")


QUANTIZED = ("nf4", "nf4-dq", "int8")  # a frozen quantized base: NF4, NF4 with double quantization, int8


def cases(precisions: Sequence[str] = PRECISIONS, full: bool = False, quick: bool = False,
          kinds: Optional[Sequence[str]] = None) -> Iterator[Case]:
    """The sweep's cases. ``quick``: a representative subset (decode and training M, N = K = 768, ranks
    16 and 100: rank blocks 16 and 64, a rank a multiple of 16 and one that is not, every flag; and one
    training call at 4096², where sm90 takes the dY pass's 256-row blocks) for the test suite. ``full``:
    every (N, K) pair and the autotune candidates. ``kinds``: only the cases of these kinds (``KINDS``)."""
    for case in _all_cases(precisions, full, quick):
        if kinds is None or case.kind in kinds:
            yield case


def _all_cases(precisions: Sequence[str], full: bool, quick: bool) -> Iterator[Case]:
    if quick:
        ms, widths, ranks = (17, 8192), ((768, 768),), (16, 100)
    else:
        ms, ranks = M_SIZES, RANKS
        widths = list(itertools.product(WIDTHS, WIDTHS)) if full else [(w, w) for w in WIDTHS]
    for precision, m, (n, k), rank in itertools.product(precisions, ms, widths, ranks):
        for bias, dropout, train_w in itertools.product((False, True), repeat=3):
            yield Case(precision, m, n, k, rank, bias, dropout, train_w)
        # W frozen; bias is an epilogue. The quick subset (CI) keeps NF4 and int8 at its first rank.
        if not quick or rank == ranks[0]:
            for quantize, dropout in itertools.product(QUANTIZED[::2] if quick else QUANTIZED, (False, True)):
                yield Case(precision, m, n, k, rank, True, dropout, False, quantize=quantize)
    if quick:  # the wide layers' dY pass (configs.WIDE_DY_ROWS on sm90), rank blocks 16 and 64, with db
        for precision, rank in itertools.product(precisions, ranks):
            yield Case(precision, 8192, 4096, 4096, rank, True, False, False)
    yield from dora_cases(precisions, ms, widths, ranks, quick)
    yield from segmented_cases(precisions, quick)
    if full:  # every candidate tile of the GEMM autotuner, where the launchers would tune (BLOCK_M >= 64)
        for precision, (n, k), rank in itertools.product(precisions, widths, (16, 100)):
            for bias, dropout in itertools.product((False, True), repeat=2):
                for index in range(_MAX_CANDIDATES):
                    yield Case(precision, 8192, n, k, rank, bias, dropout, True, index)


def dora_cases(precisions: Sequence[str], ms: Sequence[int], widths, ranks: Sequence[int],
               quick: bool) -> Iterator[Case]:
    """DoRA's kernel variants (the LoRA kernels with their DoRA flags, and the weight-norm kernel): every
    precision, M, width and rank with dropout on and off, a trainable W at the first rank; a quantized base at
    the first rank (the quick subset: NF4 and int8)."""
    for precision, m, (n, k), rank in itertools.product(precisions, ms, widths, ranks):
        for dropout in (False, True):
            yield Case(precision, m, n, k, rank, True, dropout, rank == ranks[0] and not quick, dora=True)
            if rank == ranks[0]:
                for quantize in QUANTIZED[::2] if quick else QUANTIZED:
                    yield Case(precision, m, n, k, rank, True, dropout, False, quantize=quantize, dora=True)


def segmented_cases(precisions: Sequence[str], quick: bool) -> Iterator[Case]:
    """The segmented primitives (issue #21): 64 batch rows of 64 tokens (M = 4096), K = N in {4096, 512}, rank
    bounds 16 and 64 (rank blocks 16 and 64), dropout on and off; outside ``quick`` also 64 rows of one token
    (decode: 16-token blocks)."""
    for precision, tokens, width, rank, dropout in itertools.product(
            precisions, (64,) if quick else (64, 1), (4096, 512), (16, 64), (False, True)):
        yield Case(precision, 64 * tokens, width, width, rank, False, dropout, False, segment_tokens=tokens)


def _run_segmented(case: Case, tensors: "_Tensors") -> int:
    """The six segmented primitives for ``case`` on a plan of 64 rows over a pool of 64 slots (CPU tensors:
    nothing runs); returns how many launches the forward (shrink, expand) made."""
    from types import SimpleNamespace

    from . import segmented as seg

    dtype = DTYPES[case.precision]
    rows, slots = case.m // case.segment_tokens, 64
    plan = SimpleNamespace(
        row_slot=tensors(rows, dtype=torch.int32), tokens_per_row=case.segment_tokens, rank_bound=case.rank,
        slot_rank=tensors(slots, dtype=torch.int32), slot_scaling=tensors(slots, dtype=torch.float32),
        slot_p=tensors(slots, dtype=torch.float32), dropout=case.dropout, rows_by_slot=tensors(rows, dtype=torch.int32),
        slot_row_start=tensors(slots + 1, dtype=torch.int32))
    x, y = tensors(case.m, case.k, dtype=dtype), tensors(case.m, case.n, dtype=dtype)
    a_store, b_store = tensors(slots, case.rank * case.k, dtype=dtype), tensors(slots, case.rank * case.n, dtype=dtype)
    with _fp32_precision(case.precision):
        s = seg.segmented_shrink(x, a_store, plan, 1234)
        seg.segmented_expand(s, b_store, plan, y)
        forward_launches = 2
        grad_s = seg.segmented_grad_s(y, b_store, plan)
        seg.segmented_grad_x(grad_s, a_store, plan, 1234, x)
        seg.segmented_grad_a(grad_s, x, plan, 1234)
        seg.segmented_grad_b(y, s, plan)
    return forward_launches


@contextlib.contextmanager
def _fp32_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class _Tensors:
    """Uninitialised CPU tensors per shape: nothing runs, so their contents never matter."""

    def __init__(self):
        self._cache: Dict[tuple, torch.Tensor] = {}

    def __call__(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        if key not in self._cache:
            self._cache[key] = torch.empty(shape, dtype=dtype)
        return self._cache[key]

    def quantized(self, n: int, k: int, fmt: str, build):
        """A quantized (n, k) weight in format ``fmt`` (built once by ``build()``)."""
        key = (n, k, fmt)
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


_MAX_CANDIDATES = 6  # autotune_candidates: five tiles and the default


class _NoSuchCandidate(Exception):
    pass


def _override_for(case: Case, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """For an autotune case, the configs with candidate ``case.autotune`` of each GEMM's candidate list
    (the lists start from each GEMM's heuristic tile, as :func:`_tuned_gemm` builds them)."""
    if case.autotune is None:
        return contextlib.nullcontext()
    defaults = _configs.kernel_configs(torch.device("cpu"), dtype, case.m, case.n, case.k, case.rank)
    picked = {}
    for field in ("forward", "grad_input", "grad_weight"):
        candidates = _configs.autotune_candidates(getattr(defaults, field))
        if case.autotune >= len(candidates):
            raise _NoSuchCandidate
        picked[field] = candidates[case.autotune]
    return _configs.override_configs(dataclasses.replace(defaults, **picked))


def _run_case(case: Case, tensors: _Tensors, launched: list) -> int:
    """Calls forward and backward for ``case`` (the stand-in records the kernels in ``launched``); returns
    how many of those launches ``forward`` made."""
    from . import lora_linear as ops

    if case.segment_tokens:
        return _run_segmented(case, tensors)
    dtype = DTYPES[case.precision]
    x = tensors(case.m, case.k, dtype=dtype)
    w = tensors(case.n, case.k, dtype=dtype)
    b = tensors(case.n, dtype=dtype) if case.bias else None
    lora_a = tensors(case.rank, case.k, dtype=dtype)
    lora_b = tensors(case.n, case.rank, dtype=dtype)
    p = 0.1 if case.dropout else 0.0
    if case.quantize is not None:
        from . import quantized
        from ..quant import quantize

        w = tensors.quantized(case.n, case.k, case.quantize, lambda: quantize(
            torch.zeros(case.n, case.k), case.quantize.split("-")[0], double_quant=case.quantize.endswith("-dq")))
        ops = quantized
    if case.dora:
        from . import dora

        col_scale = tensors(case.n, dtype=torch.float32)
        with _fp32_precision(case.precision), _override_for(case, dtype):
            dora.weight_norm(w, lora_a, lora_b, 2.0)
            y, s, z = dora.forward(x, w, b, lora_a, lora_b, 2.0, col_scale, p, 1234, True)
            forward_launches = len(launched)
            dora.backward(y, x, w, lora_a, lora_b, s, z, col_scale, 2.0, p, 1234,
                          (True, case.train_w, case.bias, True, True, True))
        return forward_launches
    with _fp32_precision(case.precision), _override_for(case, dtype):
        y, s = ops.forward(x, w, b, lora_a, lora_b, 2.0, p, 1234)
        forward_launches = len(launched)
        ops.backward(y, x, w, lora_a, lora_b, s, 2.0, p, 1234, (True, case.train_w, case.bias, True, True))
    return forward_launches


_ROLES = {"_lora_down_kernel": "down", "_lora_dy_kernel": "dY", "_lora_da_kernel": "dA",
          "_sum_partials_kernel": "sum", "_dropout_mask_kernel": "mask",
          "_dequant_kernel": "dequant",
          "_weight_norm_kernel": "norm"}  # DoRA's weight norm (lora_kernels.ops.dora)  # quantized: W dequantized once, above configs.DEQUANT_ONCE's crossover


_SEGMENTED_ROLES = {"_segmented_shrink_kernel": ("seg-S", "seg-dS"), "_segmented_expand_kernel": ("seg-dX", "seg-y"),
                    "_segmented_grad_kernel": ("seg-dA", "seg-dB")}  # (A layout, B layout)


def _role(name: str, constexprs: dict, in_forward: bool) -> str:
    if name in _SEGMENTED_ROLES:
        return _SEGMENTED_ROLES[name][bool(constexprs.get("B_LAYOUT"))]
    if name == "_qlora_matmul_kernel":  # the quantized GEMMs: W_T in the forward, W in dX
        return "forward" if constexprs.get("W_T") else "dX"
    if name == "_lora_matmul_kernel":
        return "forward" if in_forward else ("dX" if constexprs.get("HAS_LORA") else "dW")
    return _ROLES.get(name, name)


@dataclasses.dataclass
class KernelReport:
    """One distinct compiled kernel for one arch and what the compiler produced."""

    arch: int
    kernel: str
    roles: List[str]
    precision: str
    constexprs: Dict[str, object]
    default: bool  # reached by a default (non-autotune) configuration
    cases: int
    example: str
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    mma: str = ""
    ldgsts: int = 0
    widest_load: str = ""
    scalar_16bit_loads: int = 0
    hash: str = ""

    @property
    def config(self) -> str:
        c = self.constexprs
        parts = [f"{k}={c[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_R") if k in c]
        if "FORMAT" in c and c.get("QUANTIZED", True):  # a quantized GEMM (ops.quantized) or weight norm (ops.dora)
            parts.append(("nf4" + ("-dq" if c.get("DOUBLE_QUANT") else "")) if c["FORMAT"] == 0 else "int8")
        flags = [k.split("_", 1)[1].lower() for k in ("HAS_BIAS", "HAS_LORA", "HAS_DROPOUT", "COMPUTE_GRAD_S",
                                                      "COMPUTE_GRAD_LORA_B", "COMPUTE_GRAD_BIAS", "HAS_COL_SCALE",
                                                      "COMPUTE_GRAD_COL_SCALE", "KEEP_Z", "DORA_DROPOUT") if c.get(k)]
        if c.get("COL_SCALE"):  # DoRA's column scale: 1 in the GEMM's epilogue (forward), 2 on dY tiles (dX)
            flags.append("c-epilogue" if c["COL_SCALE"] == 1 else "c-prologue")
        # the segmented kernels (ops.segmented): B-layout weights, the keep mask on input or output, s_i per slot
        flags += [name for key, name in (("B_LAYOUT", "b-layout"), ("MASK_INPUT", "mask-in"), ("MASK_OUTPUT", "mask-out"),
                                         ("SCALE_BY_SLOT", "slot-scale")) if c.get(key)]
        parts.append(f"w{c.get('num_warps')}s{c.get('num_stages')}")
        return " ".join(parts + flags)


@dataclasses.dataclass
class CompileError:
    arch: int
    case: str
    error: str


def _ptxas_numbers(log: str) -> Tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unreadable ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` with Triton's flags, for a kernel that came from Triton's cache (no log kept).

    Triton ships two ptxas (``ptxas`` for sm < 90, ``ptxas-blackwell`` from sm90 on) and writes PTX of the
    version its compiler targeted; a PTX one of them cannot read is given to the other. When neither reads
    it, the error says what ptxas printed.
    """
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    tools = [get_ptxas(arch).path] + [t.path for t in (knobs.nvidia.ptxas, knobs.nvidia.ptxas_blackwell)]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for tool in dict.fromkeys(tools):  # in order, without repeats
            done = subprocess.run([tool, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                   f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return done.stderr + done.stdout
            errors.append(f"{Path(tool).name}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    raise RuntimeError(f"ptxas could not read a cached kernel's PTX for sm{arch}: {'; '.join(errors)}")


def _sass(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (Triton's ``asm["sass"]`` lets cuobjdump's warnings reach stderr)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


_PTXAS_LOG = "lora_kernels-ptxas-v.log"  # kept beside the kernel in Triton's cache


def _ptxas_log(compiled, arch: int, log: Optional[str]) -> str:
    """The kernel's ``ptxas -v`` report: the one its compilation printed, else the one kept in Triton's cache
    directory of the kernel by an earlier sweep, else a new ``ptxas -v`` run (the slow part of a sweep over
    cached kernels), which is then kept there. Triton's cache key covers the source, options and target, so
    a kept report belongs to exactly this binary."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    if not (log and "registers" in log):
        path = cache.get_file(_PTXAS_LOG)
        if path is not None:
            return Path(path).read_text()
        log = _run_ptxas(compiled.asm["ptx"], arch)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next sweep time
        cache.put(log, _PTXAS_LOG, binary=False)
    return log


def _read_binary(report: KernelReport, compiled, log: Optional[str]) -> None:
    report.hash = compiled.hash
    report.shared = int(compiled.metadata.shared)
    report.registers, report.spill_stores, report.spill_loads = _ptxas_numbers(
        _ptxas_log(compiled, report.arch, log))
    sass = _sass(compiled.asm["cubin"])
    report.mma = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "none")
    report.ldgsts = len(re.findall(r"\bLDGSTS\b", sass))
    widths = [int(w) for w in re.findall(r"\bLDG\.E\.(?:[A-Z.]*?)(\d+)\b", sass) if w in ("64", "128")]
    report.widest_load = f"LDG.{max(widths)}" if widths else ("LDGSTS" if report.ldgsts else "LDG.32")
    report.scalar_16bit_loads = len(re.findall(r"\bLDG\.E\.U16\b", sass))


def sweep_arch(arch: int, precisions: Sequence[str] = PRECISIONS, full: bool = False, quick: bool = False,
               kinds: Optional[Sequence[str]] = None) -> Tuple[List[KernelReport], List[CompileError]]:
    """Compiles every case of :func:`cases` (of ``kinds``, default all) for ``arch`` and reads each distinct
    kernel once."""
    from . import lora_linear as ops

    reports: Dict[str, KernelReport] = {}
    logs: Dict[str, Optional[str]] = {}
    compiled: Dict[str, object] = {}
    errors: List[CompileError] = []
    tensors = _Tensors()
    with stand_in_gpu(arch, launch="compile", ptxas_log=True) as gpu:
        def collect(case: str, precision: str, default: bool, forward_launches: int) -> None:
            for i, record in enumerate(gpu.kernels):
                key = record.compiled.hash
                role = _role(record.kernel_name, record.constexprs, i < forward_launches)
                if record.ptxas_log:
                    logs[key] = record.ptxas_log
                if key not in reports:
                    meta = record.compiled.metadata
                    constexprs = dict(record.constexprs, num_warps=meta.num_warps, num_stages=meta.num_stages)
                    reports[key] = KernelReport(arch, record.kernel_name, [], precision, constexprs, default, 0, case)
                    compiled[key] = record.compiled
                rep = reports[key]
                rep.cases += 1
                rep.default |= default
                if role not in rep.roles:
                    rep.roles.append(role)
            del gpu.kernels[:]

        if kinds is None or "lora" in kinds:
            ops.dropout_mask(1, (4096, 4096), 0.1, torch.device("cpu"))
            collect("dropout_mask 4096x4096", "bool", True, 1)
        for case in cases(precisions, full=full, quick=quick, kinds=kinds):
            try:
                forward_launches = _run_case(case, tensors, gpu.kernels)
            except _NoSuchCandidate:
                continue
            except Exception as err:  # noqa: BLE001 - every compile error is reported, the sweep goes on
                errors.append(CompileError(arch, str(case), f"{type(err).__name__}: {err}"[:2000]))
                del gpu.kernels[:]
                continue
            collect(str(case), case.precision, case.autotune is None, forward_launches)
    for key, rep in reports.items():
        _read_binary(rep, compiled[key], logs.get(key))
    return sorted(reports.values(), key=lambda r: (r.kernel, r.precision, r.config)), errors


def verdicts(reports: Iterable[KernelReport], errors: Iterable[CompileError]) -> List[str]:
    """Every failure of the gate, one line each (empty: the gate passes)."""
    failures = [f"sm{e.arch}: compile error in {e.case}: {e.error.splitlines()[0] if e.error else ''}"
                for e in errors]
    for r in reports:
        where = f"sm{r.arch} {r.kernel} [{'/'.join(r.roles)}] {r.precision} {r.config} (e.g. {r.example})"
        if not r.default:
            continue  # autotune candidates: the tuner skips what does not fit
        limit = GPUS[r.arch].max_shared_mem
        if r.shared > limit:
            failures.append(f"{where}: shared memory {r.shared} B > {limit} B")
        if r.spill_stores or r.spill_loads:
            failures.append(f"{where}: spills {r.spill_stores} B stores / {r.spill_loads} B loads")
        if (r.arch == 90 and r.precision in ("fp16", "bf16") and set(r.roles) & set(GEMM_ROLES)
                and r.constexprs.get("BLOCK_M", 0) >= 64 and r.mma != "HGMMA"):
            failures.append(f"{where}: no wgmma (MMA form {r.mma})")
    return failures


def missing_tools() -> Optional[str]:
    """Why the gate cannot run here (no ptxas / cuobjdump next to Triton), or None."""
    from triton import knobs

    for tool in ("ptxas", "ptxas_blackwell", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path
        except Exception as err:  # noqa: BLE001 - knobs raise when the binary is absent
            return f"{tool} not found ({err}); it ships with Triton's NVIDIA backend"
        if not path or not Path(path).exists():
            return f"{tool} not found (expected at {path}); it ships with Triton's NVIDIA backend"
    return None


def triton_version() -> str:
    import triton
    return triton.__version__


def ptxas_version(arch: int = 90) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\S+),", out)
    return found.group(1) if found else "unknown"
