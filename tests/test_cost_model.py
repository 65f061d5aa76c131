"""benchmarks/cost_model.py: its accounting, checked by hand on small cases."""
import dataclasses

import pytest

from benchmarks.cost_model import GPUS, LAUNCH_US, Kernel, Shape, eager, frozen, ours, predict_us


def test_frozen_linear_bytes_and_flops_by_hand():
    s = Shape(m=4, k=3, n=2, r=1, dropout=0.0, element=2)
    fwd, dx = frozen(s)
    assert fwd.bytes == (4 * 3 + 3 * 2 + 4 * 2 + 2) * 2  # x, Wᵀ, y, bias
    assert fwd.flops == 2 * 4 * 2 * 3 and dx.flops == 2 * 4 * 3 * 2


def test_a_kernel_takes_the_slowest_of_its_three_limits():
    gpu = GPUS["h100"]
    memory = Kernel("m", bytes=gpu.bandwidth * 1e-6)  # 1 µs of memory traffic
    integer = Kernel("i", bytes=gpu.bandwidth * 1e-6, int_ops=gpu.int_ops * 3e-6)  # 3 µs of integer work
    assert predict_us([memory], gpu) == pytest.approx(1 + LAUNCH_US)
    assert predict_us([integer], gpu) == pytest.approx(3 + LAUNCH_US)


@pytest.mark.parametrize("width", [512, 4096])
def test_ours_moves_fewer_bytes_than_eager_and_more_than_the_floor(width):
    s = Shape(8192, width, width, 16, 0.1)
    moved = {name: sum(k.bytes for k in fn(s)) for name, fn in (("frozen", frozen), ("eager", eager), ("ours", ours))}
    assert moved["frozen"] < moved["ours"] < moved["eager"]
    # Our extra traffic over the floor is the rank-sized tensors, one more read of x and of dY: it cannot be
    # more than that.
    e = s.element
    bound = (2 * s.m * s.k + s.m * s.n) * e + 8 * s.m * s.r * e + 4 * s.n * s.r * 4 * (s.m // 128 + 1) + 4 * s.k * s.r * e
    assert moved["ours"] - moved["frozen"] <= bound


@pytest.mark.parametrize("fmt,w_bytes", [("nf4", 4 * 128 / 2 + 4 * 128 / 64 * 4), ("int8", 4 * 128 + 4 * 4)])
def test_quantized_gemms_read_the_packed_weight(fmt, w_bytes):
    from benchmarks.cost_model import DEQUANT_OPS, ours_quantized, quantized_weight_bytes

    s = Shape(m=300, k=128, n=4, r=2, dropout=0.0, element=2)
    assert quantized_weight_bytes(fmt, 4, 128) == w_bytes
    dense, quant = ours(s), ours_quantized(s, fmt)
    changed = [(a, b) for a, b in zip(dense, quant) if a != b]
    assert len(changed) == 2, "exactly the forward and dX GEMMs read W"
    for a, b in changed:
        assert b.bytes == a.bytes - 4 * 128 * 2 + w_bytes
        assert b.int_ops == a.int_ops + DEQUANT_OPS[fmt] * 4 * 128 * 3  # 3 M-tiles of 128 rows
        assert b.flops == a.flops and b.serial_int_ops == a.serial_int_ops


def test_dequantize_then_gemm_costs_two_more_kernels():
    from benchmarks.cost_model import dequant_then_ours

    s = Shape(8192, 4096, 4096, 16, 0.1)
    assert len(dequant_then_ours(s)) == len(ours(s)) + 2
    assert sum(k.bytes for k in dequant_then_ours(s)) > sum(k.bytes for k in ours(s))


def test_mixed_batch_is_ours_at_the_summed_rank_plus_its_small_tensors_and_the_loop_repeats_ours():
    import dataclasses

    from benchmarks.cost_model import GPUS, loop_over_adapters, mixed_table, ours_mixed

    s = Shape(m=1024, k=256, n=512, r=8, dropout=0.1, element=2)
    mixed = ours_mixed(s, 4)
    fused = ours(dataclasses.replace(s, r=32))
    assert mixed[:len(fused)] == fused
    extra = mixed[len(fused):]
    assert sum(k.bytes for k in extra) == (2 * (32 * 256 + 512 * 32) + 1024 * 32 + 2 * 3 * 1024 * 32) * 2
    assert all(k.flops == 0 for k in extra)
    loop = loop_over_adapters(s, 4)
    part = ours(dataclasses.replace(s, m=256))
    assert len(loop) == 1 + 4 * (len(part) + 4)
    assert sum(k.flops for k in loop) == pytest.approx(4 * sum(k.flops for k in part))
    # Four launches of everything cost more than one launch at the summed rank at this size.
    assert predict_us(loop, GPUS["h100"]) > predict_us(mixed, GPUS["h100"])
    assert mixed_table(1024, [256], 8, 4, [GPUS["h100"]]).count("\n") == 2


def test_launched_quantized_path_follows_the_launchers_rule():
    """The cost model predicts the path ops/quantized.py takes: dequantize-once for NF4 at large M on H100, in
    the loop at small M, for int8 and on A100."""
    from benchmarks.cost_model import dequant_then_ours, launched_quantized, ours_quantized

    big, small = Shape(8192, 4096, 4096, 16, 0.1), Shape(64, 4096, 4096, 16, 0.1)
    assert launched_quantized(big, "nf4", GPUS["h100"]) == dequant_then_ours(big, "nf4")
    assert launched_quantized(small, "nf4", GPUS["h100"]) == ours_quantized(small, "nf4")
    assert launched_quantized(big, "int8", GPUS["h100"]) == ours_quantized(big, "int8")
    assert launched_quantized(big, "nf4", GPUS["a100"]) == ours_quantized(big, "nf4", GPUS["a100"])
    # where it switches, the switch is predicted to pay: once is faster than in-loop
    assert predict_us(dequant_then_ours(big, "nf4"), GPUS["h100"]) < predict_us(ours_quantized(big, "nf4"), GPUS["h100"])


def test_dequantize_once_rule_picks_a_path_the_model_predicts_near_the_better():
    """ops/configs.py's DEQUANT_ONCE rule for NF4 on H100, against this model's two paths over layer shapes
    from 512² to 8192², ranks 16 and 64 and M from 64 to 32768: the path the rule picks is never predicted
    more than 12% slower than the better path, and 1% on average (the rule is one smooth curve through the
    model's crossovers, which step with tile counts; the worst case sits next to a crossover)."""
    from lora_kernels.ops.configs import DEQUANT_ONCE

    from benchmarks.cost_model import dequant_then_ours, ours_quantized

    gpu, rule = GPUS["h100"], DEQUANT_ONCE[("nf4", 9)]
    regrets = []
    for n, k in ((512, 512), (768, 768), (1024, 1024), (2048, 2048), (4096, 1024), (4096, 4096), (4096, 11008),
                 (8192, 8192)):
        for r in (16, 64):
            for m in (64, 256, 448, 512, 704, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 32768):
                s = Shape(m, k, n, r, 0.1)
                loop = predict_us(ours_quantized(s, "nf4", gpu), gpu)
                once = predict_us(dequant_then_ours(s, "nf4", gpu), gpu)
                picked = once if m >= rule.min_m + rule.fixed_cost / (n * k) else loop
                regrets.append(picked / min(loop, once) - 1)
    assert max(regrets) <= 0.12 and sum(regrets) / len(regrets) <= 0.01


def test_partial_sums_follow_the_launchers_splits():
    """The fp32 partials of the dY pass (dS over column splits, dB per row block) and of the dA pass (row
    splits), by hand from the launchers' own block sizes and split rule."""
    import torch

    from lora_kernels.ops.configs import _heuristic_configs
    from lora_kernels.ops.launch import split_reduction as _split

    gpu = GPUS["h100"]
    s = Shape(8192, 768, 768, 16, 0.1)
    cfgs = _heuristic_configs((9, 0), 132, torch.bfloat16, 8192, 768, 768, 16, False)
    dy, da = cfgs.grad_output_pass, cfgs.grad_a
    row_blocks = 8192 // dy.block_m
    ds_splits, _ = _split(row_blocks, 768 // dy.block_n, cfgs.target_programs, cfgs.min_split_tiles)
    da_splits, _ = _split(768 // da.block_k, 8192 // da.block_m, cfgs.target_programs, cfgs.min_split_tiles)
    assert ds_splits > 1 and da_splits > 1, "the shape is chosen so that both passes split"
    kernels = {k.name: k for k in ours(s, gpu)}
    e, m, n, k, r = 2, 8192, 768, 768, 16
    assert kernels["dY pass: dS, dB partials"].bytes == (m * n + n * r + m * r) * e + ds_splits * m * r * 4 \
        + row_blocks * n * r * 4
    assert kernels["sum dS partials"].bytes == ds_splits * m * r * 4 + m * r * e
    assert kernels["sum dB, dA partials"].bytes == (row_blocks * n * r * 4 + n * r * e
                                                     + da_splits * r * k * 4 + r * k * e)
    # A row block of 256 halves the dB partials.
    halved = {k.name: k for k in ours(s, gpu, dy_block_m=256)}
    assert halved["sum dB, dA partials"].bytes == (row_blocks // 2) * n * r * 4 + n * r * e + da_splits * r * k * 4 \
        + r * k * e


def test_the_dx_mask_prologue_is_serial_per_wave_of_tiles():
    """The dX GEMM hashes its tile's mask before its main loop: HASH_OPS per element of a tile, once per wave
    of tiles on each SM, added to (not overlapped with) the GEMM's time; nothing without dropout; a stored
    bit-mask costs UNPACK_OPS per element instead."""
    import dataclasses

    from benchmarks.cost_model import HASH_OPS, UNPACK_OPS, _launcher_configs

    gpu = GPUS["h100"]
    s = Shape(8192, 768, 768, 16, 0.1)
    gi = _launcher_configs(s, gpu).grad_input
    tiles = -(-8192 // gi.block_m) * -(-768 // gi.block_n)
    waves = -(-tiles // 132)
    dx = [k for k in ours(s, gpu) if k.name.startswith("dX = ")][0]
    assert dx.serial_int_ops == waves * gi.block_m * gi.block_n * HASH_OPS and dx.int_ops == 0
    plain = [k for k in ours(dataclasses.replace(s, dropout=0.0), gpu) if k.name.startswith("dX = ")][0]
    assert plain.serial_int_ops == 0
    assert gpu.seconds(dx) - gpu.seconds(plain) == pytest.approx(dx.serial_int_ops / (gpu.int_ops / 132))
    bits = [k for k in ours(s, gpu, mask_bits=True) if k.name.startswith("dX = ")][0]
    assert bits.serial_int_ops == waves * gi.block_m * gi.block_n * UNPACK_OPS
    assert bits.bytes == dx.bytes + 8192 * 768 / 8


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_adds_exactly_its_passes_bytes_to_ours(dropout):
    """ours_dora = ours + the weight-norm pass + Z written and read, c read by three kernels, dc partials; with
    dropout twice the MMA work of the forward and dX GEMMs and the mask rebuilt per N-tile; PEFT's DoRA forms
    B·A and, with dropout, runs a second base GEMM."""
    from benchmarks.cost_model import HASH_OPS, _launcher_configs, kept_bytes, ours_dora, peft_dora

    gpu = GPUS["h100"]
    s = Shape(m=300, k=96, n=80, r=4, dropout=dropout, element=2)
    e, m, k, n, r = 2, 300, 96, 80, 4
    lora, dora = ours(s, gpu), ours_dora(s, gpu)
    cfgs = _launcher_configs(s, gpu)
    dy_blocks = -(-m // cfgs.grad_output_pass.block_m)
    dc_partials = dy_blocks * n * 4 if dy_blocks > 1 else n * 4
    norm = (n * k + r * k) * e + n * r * 4 + n * 4
    small = r * k * e + 2 * n * r * 4 + 4 * n * 4
    summed = dc_partials + n * 4 if dy_blocks > 1 else 0
    extra = norm + small + (m * n * e + n * 4) + (m * n * e + n * 4 + dc_partials) + n * 4 + summed
    assert sum(kk.bytes for kk in dora) - sum(kk.bytes for kk in lora) == pytest.approx(extra)
    assert len(dora) == len(lora) + 2 + (dy_blocks > 1)
    by_name = {kk.name.split(" ")[0]: kk for kk in lora}
    forward = next(kk for kk in dora if kk.name.startswith("y = "))
    grad_x = next(kk for kk in dora if kk.name.startswith("dX = "))
    factor = 2 if dropout else 1
    assert forward.flops == factor * by_name["y"].flops and grad_x.flops == factor * by_name["dX"].flops
    block_n = min(cfgs.forward.block_n, 128)
    assert forward.int_ops == (HASH_OPS * m * k * -(-n // block_n) if dropout else 0)
    peft = peft_dora(s, gpu)
    base_gemms = [kk for kk in peft if kk.flops == 2.0 * m * n * k]  # forward and dX, on x and on x̃
    assert len(base_gemms) == (4 if dropout else 2) and any(kk.name.startswith("B·A") for kk in peft)
    assert sum(kk.bytes for kk in peft) > sum(kk.bytes for kk in dora)
    assert kept_bytes(s, "ours-dora") - kept_bytes(s, "ours") == m * n * e < kept_bytes(s, "peft-dora")


def test_segmented_path_counts_by_hand():
    """ours_segmented: the base GEMMs plus one launch per primitive, each token paying its own rank r whatever
    the number of adapters; bytes, FLOPs, hash work and launches derived by hand for a small shape."""
    from benchmarks.cost_model import HASH_OPS, ours_mixed, ours_segmented

    m, k, n, r, e = 1024, 256, 512, 8, 2
    s = Shape(m=m, k=k, n=n, r=r, dropout=0.1, element=e)
    forward = ours_segmented(s, 4, train=False)
    assert len(forward) == 3  # base GEMM, shrink, expand
    base = (m * k + k * n + m * n + n) * e  # x, W, y, bias
    shrink = (m * k + 4 * r * k + m * r) * e  # x, four adapters' A once each, S
    expand = (m * n + m * n + m * r + 4 * n * r) * e  # y read and written, S, four B
    assert sum(kk.bytes for kk in forward) == base + shrink + expand
    assert sum(kk.flops for kk in forward) == 2 * m * n * k + 2 * m * r * k + 2 * m * r * n
    assert sum(kk.int_ops for kk in forward) == HASH_OPS * m * k  # the shrink's mask

    step = ours_segmented(s, 4)
    assert step[:3] == forward and len(step) == 8  # + base dX GEMM, dS, dX, dA, dB
    grad_x_base = (m * n + n * k + m * k) * e
    grad_s = (m * n + 4 * n * r + m * r) * e
    grad_x = (2 * m * k + m * r + 4 * r * k) * e
    grad_a = (m * k + m * r + 4 * r * k) * e  # x, dS, the (4, r·K) store written whole
    grad_b = (m * n + m * r + 4 * r * n) * e
    assert sum(kk.bytes for kk in step[3:]) == grad_x_base + grad_s + grad_x + grad_a + grad_b
    # six rank-r GEMMs (three over K, three over N) and the two base GEMMs
    assert sum(kk.flops for kk in step) == 2 * (2 * m * n * k) + 2 * m * r * (3 * k + 3 * n)
    assert sum(kk.int_ops for kk in step) == 3 * HASH_OPS * m * k  # shrink, dX epilogue, dA
    assert ours_segmented(dataclasses.replace(s, dropout=0.0), 4)[1].int_ops == 0

    # A pool of 64 slots of capacity 16: the gradient stores grow, nothing else does.
    pooled = ours_segmented(s, 4, pool_slots=64, rank_capacity=16)
    assert sum(kk.bytes for kk in pooled) - sum(kk.bytes for kk in step) == (64 * 16 - 4 * r) * (k + n) * e
    # 64 adapters: the same FLOPs and launches (each token pays r, not 64·r as the concatenation does), only the
    # adapters' weights read once more each
    many = ours_segmented(s, 64)
    assert len(many) == 8 and sum(kk.flops for kk in many) == sum(kk.flops for kk in step)
    # (A in the shrink, dX, dA store; B in the expand, dS, dB store)
    assert sum(kk.bytes for kk in many) - sum(kk.bytes for kk in step) == 3 * 60 * r * (k + n) * e
    base_flops = 2 * (2 * m * n * k)
    lora_flops = sum(kk.flops for kk in many) - base_flops
    assert lora_flops == 2 * m * r * (3 * k + 3 * n)
    # concatenated at rank 64·r: S, the dY pass (dS and dB) and dA (ours counts no LoRA FLOPs inside its fused GEMMs)
    mixed_lora = sum(kk.flops for kk in ours_mixed(s, 64)) - base_flops
    assert mixed_lora == 2 * m * (64 * r) * (2 * k + 2 * n) > 40 * lora_flops
    assert predict_us(many, GPUS["h100"]) < predict_us(ours_mixed(s, 64), GPUS["h100"])


def test_mixed_table_has_the_segmented_columns():
    from benchmarks.cost_model import mixed_table

    table = mixed_table(1024, [256, 512], 8, 4, [GPUS["h100"]])
    header, _, *rows = table.splitlines()
    assert "segmented µs" in header and "segmented fwd µs" in header and len(rows) == 2
    assert all(len(row.split("|")) == len(header.split("|")) for row in rows)
