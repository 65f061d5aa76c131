"""Compiles the quantized GEMMs (``lora_kernels.ops.quantized``) for a real GPU target without a GPU and reads
what ptxas produced: one line per distinct kernel, then a summary line.

    TRITON_CACHE_DIR=$(mktemp -d) python -m benchmarks.qlora_compile ARCH PRECISIONS SHAPES FORMATS
    e.g. ... 90 fp16,bf16,fp32,tf32 8192x4096x4096x16,17x768x768x16 nf4,nf4+dq,int8

SHAPES are MxNxKxRANK. It drives the public ``forward``/``backward`` of the quantized backend under the compile
gate's stand-in GPU (:mod:`lora_kernels.ops.standin`, compile-only), as ``python -m lora_kernels.check --aot``
does for every kernel (its sweep includes these cases; this runs them alone). A fresh ``TRITON_CACHE_DIR``
makes every kernel compile here, so its ``ptxas -v`` log is captured. Columns: arch, precision, format,
double quantization, GEMM (fwd / dX), M, BLOCK_M/N/K/R, warps, stages, shared memory (B), registers, spill
stores / loads (B), MMA form, dropout.
"""
import sys

import torch

from lora_kernels.ops import aot
from lora_kernels.ops import quantized as Q
from lora_kernels.ops.standin import GPUS, stand_in_gpu
from lora_kernels.quant import quantize


def main(argv):
    arch, precisions = int(argv[0]), argv[1].split(",")
    shapes = [tuple(map(int, s.split("x"))) for s in argv[2].split(",")]
    formats = [(f.split("+")[0], f.endswith("+dq")) for f in argv[3].split(",")]
    tensors, seen, bad = aot._Tensors(), {}, 0
    with stand_in_gpu(arch, launch="compile", ptxas_log=True) as gpu:
        for prec in precisions:
            dtype = aot.DTYPES[prec]
            for fmt, dq in formats:
                for m, n, k, r in shapes:
                    qw = quantize(torch.zeros(n, k), fmt, dq)
                    x, a, b = tensors(m, k, dtype=dtype), tensors(r, k, dtype=dtype), tensors(n, r, dtype=dtype)
                    bias = tensors(n, dtype=dtype)
                    for p in (0.0, 0.1):
                        try:
                            with aot._fp32_precision(prec):
                                y, s = Q.forward(x, qw, bias, a, b, 2.0, p, 1)
                                Q.backward(y, x, qw, a, b, s, 2.0, p, 1, (True, False, True, True, True))
                        except Exception as err:  # noqa: BLE001 - a compile error is a result
                            print("ERROR", prec, fmt, dq, m, n, k, r, p, type(err).__name__, str(err)[:300])
                            bad += 1
                            continue
                        for rec in gpu.kernels:
                            if rec.kernel_name != "_qlora_matmul_kernel" or rec.compiled.hash in seen:
                                continue
                            log = rec.ptxas_log if rec.ptxas_log and "registers" in rec.ptxas_log else \
                                aot._run_ptxas(rec.compiled.asm["ptx"], arch)
                            regs, spill_st, spill_ld = aot._ptxas_numbers(log)
                            sass = rec.compiled.asm["sass"]
                            mma = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "none")
                            c, meta = rec.constexprs, rec.compiled.metadata
                            shared = int(meta.shared)
                            row = (arch, prec, fmt, dq, "fwd" if c["W_T"] else "dX", m, c["BLOCK_M"], c["BLOCK_N"],
                                   c["BLOCK_K"], c["BLOCK_R"], meta.num_warps, meta.num_stages, shared, regs, spill_st,
                                   spill_ld, mma, "drop" if c["HAS_DROPOUT"] else "")
                            seen[rec.compiled.hash] = row
                            over = shared > GPUS[arch].max_shared_mem
                            no_wgmma = (arch == 90 and prec in ("fp16", "bf16") and c["BLOCK_M"] >= 64
                                        and mma != "HGMMA")
                            bad += bool(spill_st or spill_ld or over or no_wgmma)
                            print(*row, "OVER-SMEM" if over else "", "NO-WGMMA" if no_wgmma else "", flush=True)
                        del gpu.kernels[:]
    print(f"sm{arch}: {len(seen)} distinct quantized GEMM kernels, {bad} failing (errors, spills, shared memory "
          f"over {GPUS[arch].max_shared_mem} B, sm90 fp16/bf16 without wgmma)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
