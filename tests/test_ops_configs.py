"""lora_kernels.ops.configs: the block-size heuristics per GPU generation, dtype and shape (no kernel runs)."""
import pytest
import torch

pytest.importorskip("lora_kernels.ops.configs")  # imports triton


def test_wide_dy_row_blocks_only_where_they_fill_the_gpu():
    """256-row dY blocks on sm90 in 16 bits where row blocks x column splits still give each of the 132 SMs a
    program (4096-wide layers at M = 8192); 128 rows where they would not (768 wide: 32 row blocks x 3 splits
    = 96 programs), on sm80 and in fp32."""
    from lora_kernels.ops.configs import _heuristic_configs

    def dy(capability, dtype, m, width):
        return _heuristic_configs(capability, 132 if capability[0] == 9 else 108, dtype, m, width, width, 16,
                                  False).grad_output_pass

    assert (dy((9, 0), torch.bfloat16, 8192, 4096).block_m, dy((9, 0), torch.bfloat16, 8192, 4096).num_warps) == \
        (256, 8)
    assert dy((9, 0), torch.float16, 4096, 4096).block_m == 256  # 16 row blocks x 16 splits
    assert dy((9, 0), torch.bfloat16, 2048, 4096).block_m == 128  # 8 x 16 = 128 programs < 132
    assert dy((9, 0), torch.bfloat16, 8192, 768).block_m == 128
    assert dy((8, 0), torch.bfloat16, 8192, 4096).block_m == 128
    assert dy((9, 0), torch.float32, 8192, 4096).block_m <= 64


@pytest.mark.parametrize("m", [64, 512])
def test_ieee_fp32_dw_small_tile_takes_8_warps_on_sm86_sm89(m):
    """The IEEE fp32 dW GEMM in its 64x64x16 tile (a decode-sized reduction, or 512-wide layers): 4 warps spill
    12 B on sm86/sm89 (the compile gate's full sweep), so they take 8; sm80 keeps 4 (8 spill in its forward
    GEMM, which shares the tile)."""
    from lora_kernels.ops.configs import _heuristic_configs

    def dw(capability):
        return _heuristic_configs(capability, 84, torch.float32, m, 512, 512, 16, False).grad_weight

    assert (dw((8, 6)).num_warps, dw((8, 9)).num_warps, dw((8, 0)).num_warps) == (8, 8, 4)
    assert dw((8, 6)).block_m == dw((8, 0)).block_m == 64 and dw((8, 6)).block_n == dw((8, 0)).block_n == 64
