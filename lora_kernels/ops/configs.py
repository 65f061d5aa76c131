"""Block sizes and launch options for the LoRA kernels in :mod:`lora_kernels.ops.lora_linear`.

One cache entry per (device capability, SM count, dtype, TF32 on/off, M bucket, N, K, rank block): a new M
only looks up its bucket, it never compiles or tunes. The heuristics, the optional
autotuning (``LORA_KERNELS_AUTOTUNE=1``) and the fp32 matmul precision query live here so that the kernel
file reads kernels -> launchers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import triton
from triton.runtime.errors import OutOfResources



@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options of one kernel. For the skinny passes ``block_m`` is the row block and
    ``block_k`` (S, dA) or ``block_n`` (dY pass) the streamed column block."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class LoRAKernelConfigs:
    """Everything the launchers need for one (device, dtype, shape bucket).

    ``max_block_r`` caps the rank block (the rank is looped or split over programs above it);
    ``gemm_block_r`` caps it in the LoRA term of the forward and dX GEMMs, and ``forward_masked_block_r``
    in the forward GEMM's when the rank is not a multiple of 16 (its S and B loads are masked then);
    ``target_programs`` is the number of programs below
    which a skinny pass splits its reduction, keeping at least ``min_split_tiles`` tiles of the reduction
    per split.
    """

    forward: KernelConfig
    grad_input: KernelConfig
    grad_weight: KernelConfig
    down: KernelConfig
    grad_output_pass: KernelConfig
    grad_a: KernelConfig
    max_block_r: int = 64
    target_programs: int = 1
    min_split_tiles: int = 4
    gemm_block_r: int = 64
    forward_masked_block_r: int = 64

    def forward_block_cap(self, rank: int) -> int:
        """The rank-block cap of the forward GEMM's LoRA term for this rank."""
        cap = min(self.max_block_r, self.gemm_block_r)
        return cap if rank % 16 == 0 else min(cap, self.forward_masked_block_r)

    def grad_input_block_cap(self) -> int:
        """The rank-block cap of the dX GEMM's LoRA term."""
        return min(self.max_block_r, self.gemm_block_r)


_OVERRIDE: Optional[LoRAKernelConfigs] = None
_TUNED: Dict[tuple, KernelConfig] = {}


@contextlib.contextmanager
def override_configs(configs: LoRAKernelConfigs) -> Iterator[None]:
    """Use ``configs`` for every launch inside the ``with`` block (tests and tuning experiments)."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, configs
    try:
        yield
    finally:
        _OVERRIDE = previous


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _bucket(n: int, cap: int = 8192) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def _rank_block(rank: int, max_block_r: int) -> int:
    """The rank padded for tl.dot: a power of two >= 16, at most ``max_block_r`` (looped beyond)."""
    return min(max(16, triton.next_power_of_2(rank)), max_block_r)


@functools.lru_cache(maxsize=64)
def _device_info(device: torch.device) -> Tuple[Optional[Tuple[int, int]], int]:
    """(compute capability, SM count); (None, 1) under the interpreter."""
    if _interpreting() or device.type != "cuda":
        return None, 1
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


@dataclasses.dataclass(frozen=True)
class DequantOnce:
    """When a quantized launcher dequantizes W once per call instead of in every M-tile's main loop: for an
    input of M rows and a W of N·K elements, when ``M >= min_m + fixed_cost / (N·K)``. ``min_m`` is the
    crossover for a very large W; ``fixed_cost`` (rows × elements) is the extra launch and the 16-bit round
    trip of W, which a small W does not repay until M is larger."""

    min_m: int
    fixed_cost: float


# QLoRA's two paths (lora_kernels/ops/quantized.py). In-loop: each BLOCK_M = 128-row tile of the forward and
# dX GEMMs dequantizes the W tiles it reads, so the integer work grows with cdiv(M, 128). Dequantize-once: one
# launch writes W in x's dtype to a temporary (freed after the call), then the 16-bit kernels run: a fixed cost
# (one more launch, read the packed W, write and read 16-bit W). Keyed by (format, compute capability major);
# None is the interpreter, which has no entry (tests add one). The numbers fit benchmarks/cost_model.py's
# predictions (bf16, dropout 0.1, ranks 16 and 64), not measurements:
# * H100 (sm90), NF4: the predicted crossover is M = 448 for W of 4096² and larger (4096×11008, 8192² too), 832
#   at 2048² (and 4096×1024), 1088 at 1536², 1984 at 1024², 3392 at 768², 9280 at 512² (rank 16; 10048 at
#   rank 64, the others the same). 448 + 1.4e9 / (N·K) gives 469-531, 782, 1041, 1783, 2822 and 5789 rows
#   there; over those shapes, ranks 16 and 64 and M from 64 to 32768, the path it picks is predicted at most
#   10% slower than the better one (8192² at M = 448, next to the crossover), 0.05% on average
#   (tests/test_cost_model.py). At M = 8192 and 4096²: 701 µs dequantize-once against 1141 in-loop (16-bit W:
#   670); at M = 64: in-loop 35 µs against 72. (The model counts the dX GEMM's mask hash as serial work, its
#   prologue, which both paths pay; until 2026-11-24 it counted it as overlapped integer work. The crossovers
#   above are the corrected model's; the rule fitted to the old one stays within the same bounds.)
# * int8 (any GPU): no entry; 3 instructions per element make in-loop dequantization cheaper than the 16-bit
#   round trip up to M = 32768 (4096², M = 8192: 670 vs 706 µs on H100).
# * A100 (sm80): no entry; its tensor cores, not integer work, bound the GEMM: in-loop is predicted faster up
#   to M = 32768 (4096², M = 8192: 1941 vs 1989 µs). Other GPUs (not modelled): in-loop.
DEQUANT_ONCE: Dict[Tuple[str, Optional[int]], DequantOnce] = {
    ("nf4", 9): DequantOnce(min_m=448, fixed_cost=1.4e9),
}


def dequantize_once(device: torch.device, fmt: str, m: int, n: int, k: int) -> bool:
    """True when the quantized launchers should dequantize the (n, k) W once for an input of m rows (see
    ``DEQUANT_ONCE``)."""
    capability, _ = _device_info(device)
    rule = DEQUANT_ONCE.get((fmt, capability[0] if capability is not None else None))
    return rule is not None and m >= rule.min_m + rule.fixed_cost / max(n * k, 1)


def _pick_gemm_tile(m: int, n: int, candidates: Sequence[Tuple[KernelConfig, float]], num_sms: int) -> KernelConfig:
    """The candidate with the least modelled time: waves (ceil(tiles / SMs)) x tile area / tile efficiency."""
    def cost(item):
        cfg, efficiency = item
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        return triton.cdiv(tiles, num_sms) * cfg.block_m * cfg.block_n / efficiency
    return min(candidates, key=cost)[0]


# Opt-in shared memory per block (bytes) by compute capability: what one program may ask for at launch.
_SHARED_MEMORY = {(9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448, (8, 0): 166_912, (8, 7): 166_912}


def _shared_limit(capability: Tuple[int, int]) -> int:
    """The opt-in shared memory of this capability; 101,376 B (sm86/sm89/sm12x) for the others >= sm86, and
    65,536 B (sm75) below: a config that fits there fits every GPU Triton supports."""
    if capability in _SHARED_MEMORY:
        return _SHARED_MEMORY[capability]
    return 101_376 if capability >= (8, 6) else 65_536


# Triton's (major, minor): a few tiles compile differently across the versions CI runs (3.8 and 3.9), and the
# compile gate's report for each says which rule is whose.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def consumer_sm8x(capability: Optional[Tuple[int, int]]) -> bool:
    """sm86 and sm89 (GA10x, AD10x): sm80's instruction set with 101,376 B of shared memory, and a ptxas that
    allocates registers differently: a few fp32 tiles that fit sm80's 255 registers spill 4-16 B there."""
    return capability is not None and capability[0] == 8 and capability not in _SHARED_MEMORY


def _fit(cfg: KernelConfig, tile_elements: int, elem_bytes: int, limit: int) -> KernelConfig:
    """``cfg`` with as many pipeline stages as fit ``limit`` (at least 2): Triton keeps up to num_stages
    copies of the operand tiles of a pipelined loop (``tile_elements`` per stage) in shared memory, plus
    its epilogue scratch, for which a quarter of the limit is kept free."""
    stages = cfg.num_stages
    while stages > 2 and stages * tile_elements * elem_bytes > 0.75 * limit:
        stages -= 1
    return dataclasses.replace(cfg, num_stages=stages)


def _gemm_candidates(capability: Tuple[int, int], dtype: torch.dtype, tf32: bool):
    """(config, relative tile efficiency) pairs for the big GEMMs on this architecture, stages fitted to
    its shared memory. Each was compiled for sm80/86/89/90 by the compile gate (``check --aot``): no spills.

    TF32 tiles hold fp32 operands (twice the bytes of fp16) and fp32 wgmma operands: 128x256 tiles spill
    on sm90 (532 B with a rank block of 64), 128x128 do not.
    """
    if dtype == torch.float32 and not tf32:  # IEEE fp32 runs on CUDA cores: smaller K blocks
        # 64x64x16: 8 warps on sm90 (4 spill 8 B in dW), 4 on sm8x (8 spill 4 B in the forward GEMM)
        candidates = [(KernelConfig(64, 128, 32, 8, 8, 3), 1.0),
                      (KernelConfig(64, 64, 16, 8, 8 if capability[0] >= 9 else 4, 3), 0.9)]
    elif capability[0] >= 9 and dtype == torch.float32:
        candidates = [(KernelConfig(128, 128, 32, 8, 8, 4), 1.0), (KernelConfig(64, 128, 32, 8, 4, 4), 0.8)]
    elif capability[0] >= 9:
        candidates = [(KernelConfig(128, 256, 64, 8, 8, 3), 1.0), (KernelConfig(128, 128, 64, 8, 8, 4), 0.9),
                      (KernelConfig(64, 128, 64, 8, 4, 4), 0.75)]
    elif capability[0] == 8:  # 8 warps: with 4, the dropout variant of 128x128 spills on sm80
        candidates = [(KernelConfig(128, 128, 32, 8, 8, 4), 1.0), (KernelConfig(64, 128, 32, 8, 4, 4), 0.85)]
    else:
        candidates = [(KernelConfig(64, 64, 32, 8, 4, 2), 1.0)]
    elem, limit = dtype.itemsize, _shared_limit(capability)
    return [(_fit(c, (c.block_m + c.block_n) * c.block_k, elem, limit), e) for c, e in candidates]


# The dY pass's row block on sm90 (16-bit) where the GPU stays filled. Each row block writes one fp32 (N, r)
# partial of dB that a second launch sums, so 256 rows halve those bytes against 128 (r/64 of dY's bytes at 128
# rows: 25% at r = 16, 156% at r = 100). benchmarks/cost_model.py predicts the step (H100, M = 8192) 0.4%, 1.4%
# and 3.6% faster at 4096² and r = 16, 64, 100, 1.2-4.4% at 2048². 512-768 wide layers would gain 1-9% by the
# same model, but 256-row blocks leave SMs idle there (M = 8192, N = 768: 32 row blocks x 3 column splits =
# 96 programs), which the model does not see. `python -m lora_kernels.check --aot` finds no spill on sm90
# with 8 warps (4 warps spill 4-684 B); on sm80, 8 warps spill 32-128 B at rank blocks of 64.
WIDE_DY_ROWS = 256


def _fills_with_wide_dy_blocks(m_bucket: int, n: int, num_sms: int) -> bool:
    """Whether 256-row blocks of dY still give every SM a program: row blocks times the column splits the
    launcher can make (at least ``min_split_tiles`` = 4 tiles of 64 columns each, up to 4 programs per SM).
    The cost model assumes full bandwidth whatever the program count; this keeps that assumption plausible."""
    row_blocks = triton.cdiv(m_bucket, WIDE_DY_ROWS)
    splits = max(1, min(triton.cdiv(4 * num_sms, row_blocks), triton.cdiv(n, 64) // 4))
    return m_bucket >= 2 * WIDE_DY_ROWS and row_blocks * splits >= num_sms


@functools.lru_cache(maxsize=1024)
def _heuristic_configs(capability, num_sms, dtype, m_bucket, n, k, block_r, tf32) -> LoRAKernelConfigs:
    """The config cache: one entry per (device, dtype, M bucket, N, K, rank block); no tuning, no compilation.

    The GEMM tiles are picked for the exact N and K (a layer's widths are fixed; only M varies, so it is
    bucketed): at N = 768, M = 8192 on an H100, rounding N up to 1024 picked 128x256 tiles (192 tiles, 1.45
    waves of 132 SMs, so 2 waves) where 128x128 (384 tiles, 2.9 waves) is predicted 17% faster by the same
    wave model.

    Every choice below was checked by the compile gate (``python -m lora_kernels.check --aot``) on
    sm80/86/89/90: shared memory within the arch's limit, no register spills.
    """
    if capability is None:  # interpreter: 32-blocks (tl.dot needs >= 16), nothing split
        small = KernelConfig(32, 32, 32, group_m=4)
        return LoRAKernelConfigs(small, small, small, small, small, small, max_block_r=64, target_programs=1)
    wide = dtype != torch.float32 or tf32  # tensor cores
    elem, limit = dtype.itemsize, _shared_limit(capability)
    hopper = capability[0] >= 9
    # fp32 operands (IEEE or TF32) take twice the registers of fp16: rank blocks of 32 (64 spill in TF32)
    max_block_r = 64 if elem == 2 else 32
    # sm8x forward GEMM, rank not a multiple of 16 (masked S and B loads): a rank block of 64 spills 20 B
    # (16-bit, 128x128 tiles, 8 warps) to 296 B (64x128, 4 warps) at r = 100, 32 spills 12-32 B (TF32 64x128
    # decode tiles; 16-bit 128x128); 16 there only (a cap of 32 for every kernel moved a spill into the
    # decode dX GEMM)
    forward_masked_block_r = 16 if not hopper else max_block_r
    # IEEE fp32 GEMMs run on CUDA cores with their operands in registers: the LoRA term's S and B tiles at a
    # rank block of 32 spill 4-176 B on sm80/sm90 (64x128 decode tiles at r = 100, 64x64 at r = 32)
    gemm_block_r = 16 if not wide else max_block_r
    if m_bucket <= 64 and not hopper:  # sm8x decode tiles: the dX GEMM with dropout spilled 8 B at a rank block of 32
        gemm_block_r = 16
    stages = 4 if hopper else 3
    if m_bucket <= 64:  # decode-like: thin row tiles, narrower column tiles for more programs
        bm = max(16, m_bucket)
        # K blocks of 64 bytes x 2 (64 fp16, 32 fp32): 128 fp16 spilled on sm90 with a rank block of 64
        # IEEE fp32 (CUDA cores, operands in registers) and sm8x: K blocks of 64 bytes (4-20 B spills at 128)
        k_bytes = 128 if hopper and wide else 64
        gemm = KernelConfig(bm, 64 if bm == 16 else 128, k_bytes // elem, 8, 4, stages)
        forward = grad_input = _fit(gemm, (gemm.block_m + gemm.block_n) * gemm.block_k, elem, limit)
    else:
        candidates = _gemm_candidates(capability, dtype, tf32)
        forward = _pick_gemm_tile(m_bucket, n, candidates, num_sms)
        grad_input = _pick_gemm_tile(m_bucket, k, candidates, num_sms)
    grad_weight = _pick_gemm_tile(n, k, _gemm_candidates(capability, dtype, tf32), num_sms)
    # IEEE fp32 dW takes the small tile where 64x128x32 spills: over a decode-sized reduction (56 B on sm80),
    # and on sm90 with Triton < 3.9 (4 B with 8 warps on 3.8; none on 3.9)
    if not wide and (m_bucket <= 64 or (hopper and TRITON_VERSION < (3, 9))):
        grad_weight = _gemm_candidates(capability, dtype, tf32)[-1][0]
    if not wide and consumer_sm8x(capability) and grad_weight.num_warps == 4:
        grad_weight = dataclasses.replace(grad_weight, num_warps=8)  # 64x64x16, 4 warps: dW spills 12 B (sm86/89)
    # Memory-bound passes. IEEE fp32 dots run on CUDA cores and keep their operands in registers: smaller
    # tiles and rank blocks of 32 (larger ones spill, per ptxas on sm80/sm90). Column blocks of 256 bytes
    # (128 fp16, 64 fp32) in S and dA, halved with a rank block of 64 (12 B of spills in S on sm90).
    wide_rank = block_r > 32  # the rank's block before the cap: ranks above 32 loop or split on sm8x
    block_r = min(block_r, max_block_r)
    row_bytes = 256 if block_r <= 32 and elem == 2 else 128  # 256 B of fp32 spill 4 B in S (TF32, sm90)
    # IEEE fp32: 32 rows (64 with a rank block of 32 spill 44 B on sm80)
    down = KernelConfig(64 if wide and triton.cdiv(m_bucket, 64) >= num_sms else 32, 0, row_bytes // elem,
                        num_warps=4, num_stages=stages)
    down = _fit(down, (down.block_m + block_r) * down.block_k, elem, limit)
    if elem == 2:  # sm8x with a rank block of 64: 64 rows and 4 warps (128 rows and 8 warps spill 40 B with db)
        rows = 128 if hopper or not wide_rank else 64
        dy = KernelConfig(min(rows, max(16, m_bucket)), 64, 0,
                          num_warps=4 if block_r <= 32 or not hopper else 8, num_stages=3)
        if hopper and _fills_with_wide_dy_blocks(m_bucket, n, num_sms):
            dy = KernelConfig(WIDE_DY_ROWS, 64, 0, num_warps=8, num_stages=3)
        da = KernelConfig(64, 0, 128 // elem, num_warps=4, num_stages=3)  # 128-byte rows (256: 20 B spills, sm90)
    else:  # fp32: 64 x 32 tiles of dY, 8 warps with a rank block of 32 (4 spill 80 B on sm90, TF32 on sm80)
        # IEEE fp32 (operands in registers): 32 rows (64 spill 8-12 B on sm90 with ds, dB and db)
        dy = KernelConfig(min(64 if wide else 32, max(16, m_bucket)), 32, 0, num_warps=4 if block_r <= 16 else 8,
                          num_stages=3)
        if not wide and hopper and dy.block_m == 16 and TRITON_VERSION < (3, 9):
            dy = dataclasses.replace(dy, num_warps=8)  # 16x32, 4 warps, ds/dB/db: 4 B spilled on 3.8 (none on 3.9)
        da = KernelConfig(64 if wide else 32, 0, 64, num_warps=4, num_stages=3)
    dy = _fit(dy, dy.block_m * dy.block_n + dy.block_n * block_r, elem, limit)
    da = _fit(da, da.block_m * (da.block_k + block_r), elem, limit)
    return LoRAKernelConfigs(forward, grad_input, grad_weight, down, dy, da, max_block_r=max_block_r,
                             target_programs=4 * num_sms, gemm_block_r=gemm_block_r,
                             forward_masked_block_r=forward_masked_block_r)


def _tf32() -> bool:
    """Whether torch runs fp32 matmuls in TF32, whichever of its APIs set it.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none" = inherit
    ``torch.backends.fp32_precision``); it also reflects the legacy setters
    (``torch.set_float32_matmul_precision``, ``torch.backends.cuda.matmul.allow_tf32``). The legacy getters
    raise RuntimeError once the new API was used, so they are only the fallback for older torch.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return bool(matmul.allow_tf32)


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for this dtype: TF32 only for fp32 inputs with torch's TF32 on."""
    return "tf32" if dtype == torch.float32 and _tf32() else "ieee"


def kernel_configs(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, rank: int) -> LoRAKernelConfigs:
    """Block sizes for a LoRA linear with x (m, k), W (n, k) and this rank on ``device``: the override of
    :func:`override_configs` if one is active, else the cached heuristic for the shape bucket."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    capability, num_sms = _device_info(device)
    return _heuristic_configs(capability, num_sms, dtype, _bucket(m), n, k, _rank_block(rank, 64),
                              _input_precision(dtype) == "tf32")


def _autotune_enabled(device: torch.device) -> bool:
    return os.environ.get("LORA_KERNELS_AUTOTUNE") == "1" and device.type == "cuda" and not _interpreting()


def autotune_candidates(default: KernelConfig) -> list:
    """The GEMM tiles :func:`_tuned_gemm` times for a bucket whose heuristic tile is ``default`` (itself
    included), in a fixed order; the compile gate compiles every one of them."""
    candidates = {default}
    for bm, bn, bk, warps, stages in ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4),
                                      (64, 128, 64, 4, 4), (64, 256, 32, 8, 3)):
        candidates.add(KernelConfig(bm, bn, bk if default.block_k >= 64 else 32, default.group_m, warps, stages))
    return sorted(candidates, key=dataclasses.astuple)


def _tuned_gemm(key: tuple, default: KernelConfig, launch: Callable[[KernelConfig], None],
                timer: Optional[Callable[[Callable[[], None]], float]] = None) -> KernelConfig:
    """The GEMM tile for ``key`` (a shape *bucket*, never an exact M): timed once among a few candidates
    around ``default`` and cached; later calls in the bucket only look it up."""
    if key in _TUNED:
        return _TUNED[key]
    if default.block_m < 64:  # decode-sized M: the thin default tile is the only sensible one
        _TUNED[key] = default
        return default
    if timer is None:
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=5, rep=20)  # noqa: E731
    timings = []
    for cfg in autotune_candidates(default):
        try:
            timings.append((timer(lambda: launch(cfg)), dataclasses.astuple(cfg), cfg))
        except OutOfResources:  # too much shared memory (or registers) for this GPU: not a candidate here
            continue
        except Exception as err:  # noqa: BLE001 - any other failure is a bug to report, not a slow tile
            warnings.warn(f"lora_kernels autotune: candidate {cfg} for {key} failed and is skipped: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
    best = min(timings)[2] if timings else default
    _TUNED[key] = best
    return best


@dataclasses.dataclass(frozen=True)
class SegmentedBlocks:
    """Block sizes of one segmented kernel (:mod:`lora_kernels.ops.segmented`): ``block_m`` tokens of one
    batch row, ``block_n`` the streamed (shrink: K) or output (expand, grad) columns, ``block_r`` the rank."""

    block_m: int
    block_n: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 3


def segmented_blocks(kind: str, dtype: torch.dtype, tokens_per_row: int, rank_bound: int) -> SegmentedBlocks:
    """Block sizes of the segmented ``kind`` ("shrink", "expand", "grad") kernel: simple and safe, one set for
    every arch (the compile gate checks them on sm80/86/89/90).

    A token block never spans two batch rows, so it is at most the row's T rounded up (16..64); the rank block
    covers the rank bound up to 64 (a power of two >= 16 for ``tl.dot``; larger ranks loop over blocks of 64).
    Columns: 128 bytes of K per shrink step (64 fp16/bf16, 32 fp32), 64 output columns for the expand and grad
    tiles. fp32 (IEEE on CUDA cores, or TF32) takes at most 32 tokens and 32 ranks per block: 64 x 64 tiles
    spilled 4 B to 11 KB (sm80/86/89/90, the compile gate, Triton 3.9).
    """
    if kind not in ("shrink", "expand", "grad"):
        raise ValueError(f"kind must be 'shrink', 'expand' or 'grad', got {kind!r}")
    wide = dtype.itemsize <= 2
    cap = 64 if wide else 32
    block_m = min(cap, max(16, triton.next_power_of_2(max(int(tokens_per_row), 1))))
    block_r = min(cap, max(16, triton.next_power_of_2(max(int(rank_bound), 1))))
    if kind == "shrink":  # fp32: 2 stages (3 spilled 4-8 B in IEEE fp32's B-layout blocks on sm86/sm89)
        return SegmentedBlocks(block_m, 64 if wide else 32, block_r, num_stages=3 if wide else 2)
    # fp32: the grad kernel's token loop unpipelined (2 stages took 175-241 registers on sm80 and spilled 24-28 B
    # at 16-token blocks; 1 stage: 63-80 registers); the expand's only loop (ranks) is unpipelined anyway
    return SegmentedBlocks(block_m, 64, block_r, num_stages=3 if wide else 1)
