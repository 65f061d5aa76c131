"""A roofline cost model of one LoRA-linear training step: bytes, FLOPs, integer work and launches per kernel.

    python -m benchmarks.cost_model [--gpu h100 a100] [--m 8192] [--rank 16] [--dropout 0.1] [--adapters 4]

Every number it prints is a **prediction**, not a measurement: each kernel is assumed to run at the better of
its memory-bound and compute-bound limits (``time = max(bytes / bandwidth, flops / tensor-core peak,
integer ops / integer peak) + launch``), with no cache reuse beyond what the kernel's design states, perfect
overlap inside a kernel, and none between kernels. It is for choosing between designs and for knowing what a
GPU run should show, until one replaces it.

Providers, all with a frozen base (W gets no gradient) and x requiring grad (a layer inside a model):

* ``frozen``: ``F.linear`` alone, forward and dX: the floor any LoRA layer sits on;
* ``eager``: LoRA as PEFT and MiniMind run it, op by op: dropout materialises the mask and x̃, every
  intermediate goes through memory, the M×N LoRA product is written and added;
* ``ours``: the fused Triton design of ``lora_kernels/ops/lora_linear.py`` (forward: S pass + one GEMM;
  backward: one dY pass, one dX GEMM with the LoRA term in its accumulator, one dA pass, one partial-sum
  launch).

Mixed batches (``--adapters N``, ``lora_kernels.mixed``): ``mixed`` (:func:`ours_mixed`, the fused kernels at
rank N·r plus the concatenation's small tensors) against ``loop`` (:func:`loop_over_adapters`, the fused layer
once per adapter on its gathered rows) and ``segmented`` (:func:`ours_segmented`, issue #21: the base GEMMs,
then one launch per segmented primitive, each row paying its own adapter's rank r).

Quantized base (QLoRA, ``--quantized``), the same W in NF4 (4 bits + a fp32 absmax per 64) or int8 (+ a fp32
scale per row):

* ``ours-nf4`` / ``ours-int8``: ``lora_kernels/ops/quantized.py``: the forward and dX GEMMs read the packed
  W and dequantize each W tile in their main loop. Every M-tile of BLOCK_M = 128 rows dequantizes the whole
  W again (``DEQUANT_OPS`` instructions per element, an estimate: shift/mask/select for the nibble, two
  L1 gathers (codebook, absmax), a multiply and a convert for NF4; convert and two multiplies for int8), so
  at large M that integer work, not the bytes, bounds the GEMM;
* ``dequant+ours-nf4``: what Unsloth and torchtune do, dequantize W into a 16-bit buffer (a kernel that
  reads the packed W and writes 16-bit W, before the forward GEMM and again before dX) and run the 16-bit
  kernels;
* ``launched-nf4``: the path ``lora_kernels/ops/quantized.py`` takes on that GPU: dequantize-once (the row
  above) where ``lora_kernels/ops/configs.py``'s ``DEQUANT_ONCE`` rule, chosen from this model, says so
  (NF4 on H100 from M = 448 + 1.4e9 / (N·K)), else in-loop (``ours-nf4``).

DoRA (``--dora``, issue #20; ``lora_kernels/ops/dora.py``), trainable magnitude, frozen base:

* ``ours-dora`` (:func:`ours_dora`): the weight-norm pass (W read once for W·Aᵀ and ‖W_n‖², then (N, r) and
  (r, r) torch ops), the LoRA kernels with their DoRA flags: the forward GEMM writes Z and reads c; with
  dropout it carries a second accumulator over keep ⊙ x (twice the MMA work) and regenerates the mask in every
  N-tile's K loop (``HASH_OPS``·M·K·cdiv(N, BLOCK_N) integer work); the dY pass reads Z and c and writes
  per-row-block dc partials; the dX GEMM reads c, and with dropout doubles its MMA work;
* ``peft-dora`` (:func:`peft_dora`): PEFT's ``DoraLinearVariant`` op by op: B·A (N×K) formed every forward,
  W + s·B·A and its row norm, with dropout a second base GEMM x̃·Wᵀ (and its dX GEMM), the M×N products
  (g − 1) ⊙ x̃·Wᵀ and g ⊙ s·P and their sums, and the magnitude's gradient as M×N reductions.

GPU figures (dense, no sparsity): H100 SXM 989 TFLOP/s bf16, 3.35 TB/s HBM3, 132 SMs; A100 SXM 312 TFLOP/s
bf16, 2.04 TB/s, 108 SMs. INT32 throughput: 64 lanes per SM per clock (1.98 GHz H100, 1.41 GHz A100).
Launch cost: 3 µs of GPU time per kernel (the host side is measured separately by
``python -m benchmarks.host_overhead``). The dropout hash costs ``HASH_OPS`` integer instructions per
element each time a kernel regenerates the mask, read from the sm90 SASS (``cuobjdump -sass``) of the S
pass at BLOCK_M 32 x BLOCK_K 128, 4 warps (32 elements per thread per iteration): dropout adds 312
instructions to it, ~10 per element (472, ~15, with the full avalanche mixer per element it replaced).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional, Sequence

HASH_OPS = 10  # integer instructions per element to regenerate one keep/drop bit (sm90 SASS)
UNPACK_OPS = 3  # per element to read a stored keep bit (shift, and, select): an estimate, for the design table
LAUNCH_US = 3.0
DEQUANT_OPS = {"nf4": 8, "int8": 3}  # instructions per W element per dequantization (estimate, see above)
QUANT_BLOCK_M = 128  # rows per M-tile of the quantized GEMMs at training M (each tile dequantizes all of W)


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # dense bf16/fp16 tensor-core peak, TFLOP/s
    bandwidth: float  # HBM bytes per second
    int_ops: float  # INT32 operations per second
    capability_major: int  # the compute capability's major number, the key of ops/configs.py's DEQUANT_ONCE
    num_sms: int

    def seconds(self, kernel: "Kernel") -> float:
        overlapped = max(kernel.bytes / self.bandwidth, kernel.flops / (self.tflops * 1e12),
                         kernel.int_ops / self.int_ops)
        return overlapped + kernel.serial_int_ops / (self.int_ops / self.num_sms)


GPUS = {
    "h100": GPU("H100 SXM", 989.0, 3.35e12, 132 * 64 * 1.98e9, 9, 132),
    "a100": GPU("A100 SXM", 312.0, 2.04e12, 108 * 64 * 1.41e9, 8, 108),
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float = 0.0
    int_ops: float = 0.0
    # Integer work per SM that overlaps nothing else of the kernel: the dX GEMM's mask prologue, which every
    # tile runs before its main loop (one resident tile per SM), once per wave of tiles.
    serial_int_ops: float = 0.0


@dataclasses.dataclass(frozen=True)
class Shape:
    m: int
    k: int
    n: int
    r: int
    dropout: float = 0.1
    element: int = 2  # bytes per element (bf16)


def _gemm(name: str, m: int, n: int, k: int, e: int, extra_bytes: float = 0.0, int_ops: float = 0.0,
          serial_int_ops: float = 0.0) -> Kernel:
    """C (m, n) = A (m, k) · B (k, n), each operand read once, C written once."""
    return Kernel(name, (m * k + k * n + m * n) * e + extra_bytes, 2.0 * m * n * k, int_ops, serial_int_ops)


def frozen(s: Shape) -> List[Kernel]:
    e = s.element
    return [_gemm("forward y = x·Wᵀ + b", s.m, s.n, s.k, e, s.n * e),
            _gemm("dX = dY·W", s.m, s.k, s.n, e)]


def eager(s: Shape) -> List[Kernel]:
    """PEFT's ``lora.Linear`` op by op (torch eager): what each op reads and writes."""
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r
    ks = []
    if s.dropout > 0:  # x̃ = dropout(x): reads x, writes x̃ and the mask (1 byte per element)
        ks.append(Kernel("dropout (x̃, mask)", m * k * (2 * e + 1), 0.0, m * k * 4))
    ks += [_gemm("base y0 = x·Wᵀ + b", m, n, k, e, n * e),
           _gemm("S = x̃·Aᵀ", m, r, k, e),
           _gemm("P = S·Bᵀ", m, n, r, e),
           Kernel("y = y0 + s·P", 3 * m * n * e)]
    # backward: dP = s·dY; dS = dP·B; dB = dPᵀ·S; dx̃ = dS·A; dA = dSᵀ·x̃; dX = dY·W + mask ⊙ dx̃ / (1-p)
    ks += [Kernel("dP = s·dY", 2 * m * n * e),
           _gemm("dS = dP·B", m, r, n, e),
           _gemm("dB = dPᵀ·S", n, r, m, e),
           _gemm("dx̃ = dS·A", m, k, r, e),
           _gemm("dA = dSᵀ·x̃", r, k, m, e),
           _gemm("dX0 = dY·W", m, k, n, e)]
    if s.dropout > 0:
        ks.append(Kernel("dX1 = mask ⊙ dx̃ / (1-p)", m * k * (2 * e + 1)))
    ks.append(Kernel("dX = dX0 + dX1", 3 * m * k * e))
    return ks


def _launcher_configs(s: Shape, gpu: GPU):
    """The block sizes ``lora_kernels/ops/configs.py`` picks for this shape on ``gpu`` (its own rule, not a copy)."""
    import torch

    from lora_kernels.ops.configs import _bucket, _heuristic_configs, _rank_block

    dtype = torch.bfloat16 if s.element == 2 else torch.float32
    return _heuristic_configs((gpu.capability_major, 0), gpu.num_sms, dtype, _bucket(s.m), s.n, s.k,
                              _rank_block(s.r, 64), False)


def ours(s: Shape, gpu: Optional[GPU] = None, dy_block_m: Optional[int] = None,
         mask_bits: bool = False) -> List[Kernel]:
    """The fused design on ``gpu`` (default H100): the bytes each kernel reads and writes, the GEMM FLOPs, the
    hash's integer work, and the fp32 partial sums the launchers' splits create (dS over dY's column splits,
    dB and db per dY row block, dA over x's row splits), with the launchers' own block sizes and splits.

    Two design candidates, not built, for ``python -m benchmarks.cost_model``'s design table:
    ``dy_block_m`` overrides the dY pass's row block (fewer dB partials, fewer programs); ``mask_bits`` has
    the S pass store the keep-mask as bits (M·K/8 bytes, kept for backward) that the dX GEMM and the dA pass
    unpack (``UNPACK_OPS`` per element) instead of rehashing.
    """
    from lora_kernels.ops.configs import _rank_block
    from lora_kernels.ops.launch import split_reduction as _split

    gpu = gpu or GPUS["h100"]
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r
    cfgs = _launcher_configs(s, gpu)
    block_r = _rank_block(r, cfgs.max_block_r)
    r_blocks = -(-r // block_r)
    # the dY pass: dS split over dY's column tiles, dB (and db) one fp32 partial per row block
    dy_rows = dy_block_m or cfgs.grad_output_pass.block_m
    dy_blocks = -(-m // dy_rows)
    ds_splits, _ = _split(dy_blocks * r_blocks, -(-n // cfgs.grad_output_pass.block_n), cfgs.target_programs,
                          cfgs.min_split_tiles)
    ds_partials = ds_splits * m * r * 4 if ds_splits > 1 else 0
    db_partials = dy_blocks * n * r * 4 if dy_blocks > 1 else 0
    # the dA pass: x's row tiles split over programs
    da_cfg = cfgs.grad_a
    da_splits, _ = _split(-(-k // da_cfg.block_k) * r_blocks, -(-m // da_cfg.block_m), cfgs.target_programs,
                          cfgs.min_split_tiles)
    da_partials = da_splits * r * k * 4 if da_splits > 1 else 0
    # the dX GEMM's prologue: each tile hashes (or unpacks) its BLOCK_M x BLOCK_N mask before its main loop
    gi = cfgs.grad_input
    waves = -(-(-(-m // gi.block_m) * -(-k // gi.block_n)) // gpu.num_sms)
    per_element = (UNPACK_OPS if mask_bits else HASH_OPS) if s.dropout > 0 else 0
    bits = m * k / 8 if s.dropout > 0 and mask_bits else 0.0
    hash_ops = HASH_OPS * m * k if s.dropout > 0 else 0.0
    kernels = [
        Kernel("S = (keep ⊙ x)·Aᵀ/(1-p)", (m * k + r * k + m * r) * e + bits, 2.0 * m * k * r, hash_ops),
        _gemm("y = s·S·Bᵀ + x·Wᵀ + b", m, n, k, e, (m * r + n * r + n) * e, 0.0),
        Kernel("dY pass: dS, dB partials", (m * n + n * r + m * r) * e + (ds_partials or m * r * e)
               + (db_partials or n * r * e), 4.0 * m * n * r),
    ]
    if ds_partials:
        kernels.append(Kernel("sum dS partials", ds_partials + m * r * e))
    kernels += [
        _gemm("dX = keep ⊙ dS·A/(1-p) + dY·W", m, k, n, e, (m * r + r * k) * e + bits,
              serial_int_ops=waves * gi.block_m * gi.block_n * per_element),
        Kernel("dA = dSᵀ·(keep ⊙ x)/(1-p)", (m * k + m * r) * e + (da_partials or r * k * e) + bits,
               2.0 * m * k * r, per_element * m * k),
    ]
    if db_partials or da_partials:
        kernels.append(Kernel("sum dB, dA partials", db_partials + n * r * e + da_partials + r * k * e))
    return kernels


def ours_dora(s: Shape, gpu: Optional[GPU] = None) -> List[Kernel]:
    """``ours`` with DoRA's additions (see the module docstring), kernel by kernel; the magnitude is trained
    (Z kept), the base frozen."""
    gpu = gpu or GPUS["h100"]
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r
    cfgs = _launcher_configs(s, gpu)
    dy_blocks = -(-m // cfgs.grad_output_pass.block_m)
    dc_partials = dy_blocks * n * 4 if dy_blocks > 1 else n * 4
    # the forward GEMM's N tiles (at most 128 wide with dropout: two fp32 accumulators)
    block_n = min(cfgs.forward.block_n, 128) if s.dropout > 0 else cfgs.forward.block_n
    second = 2.0 if s.dropout > 0 else 1.0
    forward_hash = HASH_OPS * m * k * -(-n // block_n) if s.dropout > 0 else 0.0
    kernels = [Kernel("weight norm: W·Aᵀ and ‖W_n‖² (one pass over W)", (n * k + r * k) * e + n * r * 4 + n * 4,
                      2.0 * n * k * r + 2.0 * n * k),
               Kernel("n² from W·Aᵀ, B and the Gram A·Aᵀ; g = m / n", r * k * e + 2 * n * r * 4 + 4 * n * 4,
                      2.0 * r * r * k + 4.0 * n * r * r)]
    for kernel in ours(s, gpu):
        if kernel.name.startswith("y = "):
            kernel = dataclasses.replace(kernel, name="y = c ⊙ (s·S·Bᵀ + x·Wᵀ) + b, Z kept" + (
                ", second accumulator over keep ⊙ x" if s.dropout > 0 else ""),
                bytes=kernel.bytes + m * n * e + n * 4, flops=kernel.flops * second,
                int_ops=kernel.int_ops + forward_hash)
        elif kernel.name.startswith("dY pass"):
            kernel = dataclasses.replace(kernel, name="dY pass: dS, dB partials, dc partials (dY' = c ⊙ dY)",
                                         bytes=kernel.bytes + m * n * e + n * 4 + dc_partials, flops=kernel.flops + 2.0 * m * n)
        elif kernel.name.startswith("dX = "):
            kernel = dataclasses.replace(kernel, name="dX = dY'·W + dS·A" + (
                " (dropout: second accumulator over (c − 1) ⊙ dY)" if s.dropout > 0 else ""),
                bytes=kernel.bytes + n * 4, flops=kernel.flops * second)
        kernels.append(kernel)
    if dy_blocks > 1:
        kernels.append(Kernel("sum dc partials", dc_partials + n * 4))
    return kernels


def peft_dora(s: Shape, gpu: Optional[GPU] = None) -> List[Kernel]:
    """PEFT's DoRA (``DoraLinearVariant``) op by op on top of its LoRA (:func:`eager`): what each op reads and
    writes. ``gpu`` is unused (the ops are torch's), kept for the providers' signature."""
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r
    ks = eager(s)
    ks += [_gemm("B·A (N×K), formed every forward", n, k, r, e),
           Kernel("W + s·B·A", 3 * n * k * e),
           Kernel("‖W + s·B·A‖ per row", n * k * e + n * 4),
           Kernel("g = m / ‖·‖ (detached)", 3 * n * 4)]
    if s.dropout > 0:  # the base output on x̃, a second full GEMM (and its dX GEMM below)
        ks.append(_gemm("base on x̃: x̃·Wᵀ", m, n, k, e))
    ks += [Kernel("(g − 1) ⊙ x̃·Wᵀ", 2 * m * n * e),
           Kernel("g ⊙ s·P", 2 * m * n * e),
           Kernel("y += both", 4 * m * n * e)]
    # backward: dg = Σ_rows dY ⊙ (x̃·Wᵀ + s·P) as two M×N products and reductions, g ⊙ dY and (g − 1) ⊙ dY
    ks += [Kernel("dY ⊙ x̃·Wᵀ, Σ_rows", 3 * m * n * e), Kernel("dY ⊙ s·P, Σ_rows", 3 * m * n * e),
           Kernel("g ⊙ dY", 2 * m * n * e), Kernel("(g − 1) ⊙ dY", 2 * m * n * e)]
    if s.dropout > 0:
        ks += [_gemm("dx̃ += ((g − 1) ⊙ dY)·W", m, k, n, e), Kernel("dx̃ sum", 3 * m * k * e)]
    return ks


def kept_bytes(s: Shape, provider: str) -> float:
    """Bytes a provider keeps for backward beyond x (which the base linear keeps anyway): ours-lora S;
    ours-dora S and Z; peft-dora (as PEFT's autograd graph holds them) S, P = S·Bᵀ, the base output on x̃
    for dg, and with dropout x̃ and its bool mask."""
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r
    dropped = (m * k * e + m * k) if s.dropout > 0 else 0
    return {"ours": m * r * e, "ours-dora": m * r * e + m * n * e,
            "peft-dora": m * r * e + 2 * m * n * e + dropped}[provider]


def dora_table(shapes: Sequence[Shape], gpus: Sequence[GPU]) -> str:
    """A markdown table of predicted µs per DoRA training step: ours (fused), our LoRA, PEFT's DoRA."""
    lines = ["| GPU | M×K→N, r, p | our LoRA µs | ours DoRA µs | PEFT DoRA µs | DoRA / LoRA (ours) | PEFT / ours | "
             "kept MiB ours / PEFT |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for gpu in gpus:
        for s in shapes:
            lora, dora, peft = (predict_us(fn(s, gpu), gpu) for fn in (ours, ours_dora, peft_dora))
            kept = kept_bytes(s, "ours-dora") / 2**20, kept_bytes(s, "peft-dora") / 2**20
            lines.append(f"| {gpu.name} | {s.m}×{s.k}→{s.n}, {s.r}, {s.dropout:g} | {lora:.1f} | {dora:.1f} | "
                         f"{peft:.1f} | {dora / lora:.2f} | {peft / dora:.2f} | {kept[0]:.0f} / {kept[1]:.0f} |")
    return "\n".join(lines)


def ours_mixed(s: Shape, adapters: int, gpu: Optional[GPU] = None) -> List[Kernel]:
    """A mixed batch (``lora_kernels.mixed``): ``adapters`` adapters of rank ``s.r`` concatenated along the
    rank, so the fused kernels run at rank Σr = adapters·r, plus the small tensors the concatenation adds:
    ``torch.cat`` of A and B, the per-row scale (M, Σr) built and applied to S and to dS."""
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r * adapters
    return ours(dataclasses.replace(s, r=r), gpu) + [
        Kernel("cat A, B", 2 * (r * k + n * r) * e),
        Kernel("Scale (M, Σr) from the row index", m * r * e),
        Kernel("S' = S ⊙ Scale", 3 * m * r * e),
        Kernel("dS' = dS ⊙ Scale", 3 * m * r * e),
    ]


def loop_over_adapters(s: Shape, adapters: int, gpu: Optional[GPU] = None) -> List[Kernel]:
    """A Python loop over adapters: each gathers its rows of x, runs the fused layer on them, and scatters its
    rows of y; backward gathers its rows of dY and scatters its rows of dX (into a zeroed dX)."""
    e, m, k, n = s.element, s.m, s.k, s.n
    rows = -(-m // adapters)
    part = dataclasses.replace(s, m=rows)
    ks = [Kernel("zero dX", m * k * e)]
    for a in range(adapters):
        ks += [Kernel(f"gather x rows ({a})", 2 * rows * k * e), *ours(part, gpu),
               Kernel(f"scatter y rows ({a})", 2 * rows * n * e), Kernel(f"gather dY rows ({a})", 2 * rows * n * e),
               Kernel(f"scatter dX rows ({a})", 2 * rows * k * e)]
    return ks


def ours_segmented(s: Shape, adapters: int, gpu: Optional[GPU] = None, train: bool = True,
                   pool_slots: Optional[int] = None, rank_capacity: Optional[int] = None) -> List[Kernel]:
    """The segmented path (issue #21, ``lora_kernels/ops/segmented.py``): every token's row uses one of
    ``adapters`` adapters of rank ``s.r`` (rows spread over them), and pays that rank only, whatever the
    number of adapters. The base GEMMs run on their own (``frozen``); the LoRA term is one launch per
    primitive: forward the shrink S = x̃·A_iᵀ (M, r) and the expand y += s_i·S·B_iᵀ (a read-modify-write of y);
    backward dS = s_i·dY·B_i/(1-p), dX += keep ⊙ dS·A_i (read-modify-write of dX), dA and dB per slot. Each
    adapter's A and B are read from HBM once per kernel (the programs of its rows share them through L2); the
    grad kernels write every slot of the pool's gradient stores (``pool_slots`` × ``rank_capacity`` × K or N,
    zeros where unused; default: ``adapters`` slots of rank ``s.r``). The mask is rehashed where x is read
    (shrink, dA) and on dX's elements (expand epilogue), ``HASH_OPS`` per element, overlapped with the loads.
    ``train=False``: the forward only (base GEMM, shrink, expand). ``gpu`` is unused (no launcher-chosen
    splits), kept for the providers' signature."""
    e, m, k, n, r = s.element, s.m, s.k, s.n, s.r
    slots, cap = pool_slots or adapters, rank_capacity or r
    hashed = HASH_OPS * m * k if s.dropout > 0 else 0.0
    base_forward, base_grad_x = frozen(s)
    kernels = [base_forward,
               Kernel("segmented shrink S = (keep ⊙ x)·A_iᵀ/(1-p)", (m * k + adapters * r * k + m * r) * e,
                      2.0 * m * k * r, hashed),
               Kernel("segmented expand y += s_i·S·B_iᵀ", (2 * m * n + m * r + adapters * n * r) * e, 2.0 * m * n * r)]
    if not train:
        return kernels
    return kernels + [
        base_grad_x,
        Kernel("segmented dS = s_i·dY·B_i/(1-p)", (m * n + adapters * n * r + m * r) * e, 2.0 * m * n * r),
        Kernel("segmented dX += keep ⊙ dS·A_i", (2 * m * k + m * r + adapters * r * k) * e, 2.0 * m * k * r, hashed),
        Kernel("segmented dA_i = dSᵀ·(keep ⊙ x), whole store", (m * k + m * r + slots * cap * k) * e,
               2.0 * m * k * r, hashed),
        Kernel("segmented dB_i = s_i·dYᵀ·S, whole store", (m * n + m * r + slots * cap * n) * e, 2.0 * m * n * r),
    ]


def mixed_table(m: int, widths: Sequence[int], rank: int, adapters: int, gpus: Sequence[GPU],
                dropout: float = 0.1) -> str:
    """A markdown table of predicted µs per training step (K = N = each width): one adapter over the batch,
    a mixed batch of ``adapters`` adapters concatenated, a loop over them, and the segmented path (its
    forward alone too)."""
    lines = ["| GPU | M×K→N, r × adapters, p | one adapter µs | mixed µs | loop µs | segmented µs | segmented fwd µs "
             "| mixed / one | loop / mixed | segmented / mixed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for gpu, width in ((gpu, width) for gpu in gpus for width in widths):
        s = Shape(m, width, width, rank, dropout)
        one, mixed, loop, segmented, forward = (predict_us(ks, gpu) for ks in (
            ours(s, gpu), ours_mixed(s, adapters, gpu), loop_over_adapters(s, adapters, gpu),
            ours_segmented(s, adapters, gpu), ours_segmented(s, adapters, gpu, train=False)))
        lines.append(f"| {gpu.name} | {m}×{width}→{width}, {rank} × {adapters}, {dropout:g} | {one:.1f} | {mixed:.1f} | "
                     f"{loop:.1f} | {segmented:.1f} | {forward:.1f} | {mixed / one:.2f} | {loop / mixed:.2f} | "
                     f"{segmented / mixed:.2f} |")
    return "\n".join(lines)


def design_table(shapes: Sequence[Shape], gpus: Sequence[GPU]) -> str:
    """A markdown table of design choices around the built design (``ours``, the launchers' block sizes): the
    share of a step that the dX GEMM's serial mask prologue and the fp32 partial sums take, the step with the
    dY pass at 128-row blocks everywhere (before ``WIDE_DY_ROWS``), and with the mask stored as bits."""
    lines = ["| GPU | M×K→N, r, p | ours µs | dY rows | dX mask prologue | partial sums | dY rows 128 µs | "
             "mask bits µs |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for gpu in gpus:
        for s in shapes:
            kernels = ours(s, gpu)
            step = predict_us(kernels, gpu)
            prologue = sum(k.serial_int_ops for k in kernels) / (gpu.int_ops / gpu.num_sms) * 1e6
            sums = predict_us([k for k in kernels if k.name.startswith("sum ")], gpu)
            rows, bits = (predict_us(ours(s, gpu, **kw), gpu) for kw in ({"dy_block_m": 128}, {"mask_bits": True}))
            launched_rows = _launcher_configs(s, gpu).grad_output_pass.block_m
            lines.append(f"| {gpu.name} | {s.m}×{s.k}→{s.n}, {s.r}, {s.dropout:g} | {step:.1f} | {launched_rows} | "
                         f"{prologue:.1f} µs ({prologue / step:.0%}) | {sums:.1f} µs ({sums / step:.0%}) | "
                         f"{rows:.1f} ({rows / step - 1:+.1%}) | {bits:.1f} ({bits / step - 1:+.1%}) |")
    return "\n".join(lines)


def quantized_weight_bytes(fmt: str, n: int, k: int) -> float:
    """Bytes of an (n, k) weight in NF4 (codes + fp32 absmax per 64) or int8 (codes + fp32 scale per row)."""
    if fmt == "nf4":
        return n * k / 2 + n * k / 64 * 4
    if fmt == "int8":
        return n * k + n * 4
    raise ValueError(f"format must be 'nf4' or 'int8', got {fmt!r}")


def ours_quantized(s: Shape, fmt: str, gpu: Optional[GPU] = None) -> List[Kernel]:
    """``ours`` with the two GEMMs reading the packed W and dequantizing it per M-tile in their main loop."""
    e, m, k, n = s.element, s.m, s.k, s.n
    dequant = DEQUANT_OPS[fmt] * n * k * max(1, -(-m // QUANT_BLOCK_M))
    out = []
    for kernel in ours(s, gpu):
        if kernel.name.startswith(("y = ", "dX = ")):  # the two GEMMs that read W
            kernel = dataclasses.replace(kernel, name=kernel.name + f" [{fmt} W]", int_ops=kernel.int_ops + dequant,
                                         bytes=kernel.bytes - n * k * e + quantized_weight_bytes(fmt, n, k))
        out.append(kernel)
    return out


def dequant_then_ours(s: Shape, fmt: str = "nf4", gpu: Optional[GPU] = None) -> List[Kernel]:
    """Dequantize W to 16 bits before each GEMM that reads it (forward, dX), then the 16-bit kernels."""
    e, n, k = s.element, s.n, s.k
    dequant = Kernel(f"dequantize {fmt} W -> 16-bit", quantized_weight_bytes(fmt, n, k) + n * k * e, 0.0,
                     DEQUANT_OPS[fmt] * n * k)
    kernels = ours(s, gpu)
    return [dequant, *kernels[:2], dequant, *kernels[2:]]


def launched_quantized(s: Shape, fmt: str, gpu: GPU) -> List[Kernel]:
    """The kernels ``lora_kernels/ops/quantized.py`` launches on ``gpu``: dequantize-once where the rule of
    ``lora_kernels/ops/configs.py`` (``DEQUANT_ONCE``) applies, else in-loop dequantization."""
    from lora_kernels.ops.configs import DEQUANT_ONCE  # the launcher's own rule, not a copy of it

    rule = DEQUANT_ONCE.get((fmt, gpu.capability_major))
    once = rule is not None and s.m >= rule.min_m + rule.fixed_cost / (s.n * s.k)
    return dequant_then_ours(s, fmt, gpu) if once else ours_quantized(s, fmt, gpu)


PROVIDERS = {"frozen": lambda s, gpu: frozen(s), "eager": lambda s, gpu: eager(s), "ours": ours}
QUANTIZED_PROVIDERS = {"ours": ours, "ours-nf4": lambda s, gpu: ours_quantized(s, "nf4", gpu),
                       "ours-int8": lambda s, gpu: ours_quantized(s, "int8", gpu),
                       "dequant+ours-nf4": lambda s, gpu: dequant_then_ours(s, "nf4", gpu)}


def predict_us(kernels: Sequence[Kernel], gpu: GPU) -> float:
    """Predicted µs of a list of kernels run one after another."""
    return sum(gpu.seconds(k) * 1e6 + LAUNCH_US for k in kernels)


def table(shapes: Sequence[Shape], gpus: Sequence[GPU]) -> str:
    """A markdown table of predicted µs per training step and the ratios that matter."""
    lines = ["| GPU | M×K→N, r, p | frozen µs | eager µs | ours µs | ours / frozen | eager / ours | launches (ours) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for gpu in gpus:
        for s in shapes:
            t = {name: predict_us(fn(s, gpu), gpu) for name, fn in PROVIDERS.items()}
            lines.append(f"| {gpu.name} | {s.m}×{s.k}→{s.n}, {s.r}, {s.dropout:g} | {t['frozen']:.1f} | "
                         f"{t['eager']:.1f} | {t['ours']:.1f} | {t['ours'] / t['frozen']:.2f} | "
                         f"{t['eager'] / t['ours']:.2f} | {len(ours(s, gpu))} |")
    return "\n".join(lines)


def quantized_table(shapes: Sequence[Shape], gpus: Sequence[GPU]) -> str:
    """A markdown table of predicted µs per training step with a 16-bit, NF4 and int8 base."""
    names = list(QUANTIZED_PROVIDERS)
    lines = ["| GPU | M×K→N, r, p | " + " | ".join(f"{name} µs" for name in names)
             + " | launched-nf4 µs (path) | W bytes nf4 / 16-bit |",
             "| --- | --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
    for gpu in gpus:
        for s in shapes:
            t = [predict_us(QUANTIZED_PROVIDERS[name](s, gpu), gpu) for name in names]
            launched = launched_quantized(s, "nf4", gpu)
            path = "once" if launched[0].name.startswith("dequantize") else "in-loop"
            ratio = quantized_weight_bytes("nf4", s.n, s.k) / (s.n * s.k * s.element)
            lines.append(f"| {gpu.name} | {s.m}×{s.k}→{s.n}, {s.r}, {s.dropout:g} | "
                         + " | ".join(f"{v:.1f}" for v in t)
                         + f" | {predict_us(launched, gpu):.1f} ({path}) | {ratio:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__.splitlines()[0])
    p.add_argument("--gpu", nargs="+", default=["h100", "a100"], choices=sorted(GPUS))
    p.add_argument("--m", type=int, default=8192, help="tokens per step")
    p.add_argument("--widths", type=int, nargs="+", default=[512, 768, 4096], help="K = N")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--adapters", type=int, default=4, help="adapters in a mixed batch")
    args = p.parse_args(argv)
    if args.m < 1 or args.rank < 1 or args.adapters < 1 or any(w < 1 for w in args.widths) or not 0 <= args.dropout < 1:
        p.error("--m, --rank, --adapters and --widths must be >= 1 and --dropout in [0, 1)")
    shapes = [Shape(args.m, w, w, args.rank, args.dropout) for w in args.widths]
    print("Predicted (roofline model, not measured) µs per LoRA-linear training step, bf16, frozen base:")
    print(table(shapes, [GPUS[g] for g in args.gpu]))
    print()
    print("Predicted µs per training step with a quantized base (QLoRA), same shapes:")
    print(quantized_table(shapes, [GPUS[g] for g in args.gpu]))
    print()
    print(f"Predicted µs per training step of a mixed batch over {args.adapters} adapters of rank {args.rank}:")
    print(mixed_table(args.m, args.widths, args.rank, args.adapters, [GPUS[g] for g in args.gpu], args.dropout))
    print()
    print("Design candidates of the fused step (predictions of designs not built, see ours()):")
    print(design_table(shapes, [GPUS[g] for g in args.gpu]))
    print()
    print("Predicted µs per DoRA training step (trainable magnitude, frozen base), dropout off and on:")
    dora_shapes = [dataclasses.replace(sh, dropout=p) for sh in shapes for p in (0.0, args.dropout)]
    print(dora_table(dora_shapes, [GPUS[g] for g in args.gpu]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
