import pytest
import torch

from ad_lightning.nn.patches import PatchGrid, assemble_patches, extract_patches
from ad_lightning.nn.pooling import ParallelCascadedPooling, global_max_pool

SIZES = [
    (32, 32, 8, 8),  # tiling, no overlap
    (32, 32, 8, 4),  # half overlap
    (64, 64, 32, 16),  # CPCAE-like
    (30, 28, 8, 5),  # grid does not end on the border: padded
    (17, 23, 5, 3),  # odd everything
    (16, 16, 16, 1),  # one patch
]


@pytest.mark.parametrize(("h", "w", "p", "s"), SIZES)
def test_extract_then_assemble_round_trips(h: int, w: int, p: int, s: int) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, h, w)
    grid = PatchGrid(h, w, p, s)
    patches = extract_patches(images, grid)
    assert patches.shape == (2, grid.rows * grid.cols, 3, p, p)
    back = assemble_patches(patches, grid)
    assert back.shape == images.shape
    torch.testing.assert_close(back, images, rtol=0, atol=1e-6)


def test_patches_are_row_major_image_crops() -> None:
    images = torch.arange(2 * 20 * 24, dtype=torch.float32).view(1, 2, 20, 24)
    grid = PatchGrid(20, 24, 8, 4)
    patches = extract_patches(images, grid)
    assert (grid.rows, grid.cols) == (4, 5)
    for n in range(grid.num_patches):
        r, c = divmod(n, grid.cols)
        assert torch.equal(patches[0, n], images[0, :, 4 * r : 4 * r + 8, 4 * c : 4 * c + 8])


def test_assembly_averages_overlaps() -> None:
    # patch n filled with the value n: a pixel becomes the mean index of the patches covering it
    grid = PatchGrid(12, 12, 8, 4)  # 2 x 2 patches, overlap in the middle 4 x 4
    patches = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1, 1).expand(1, 4, 1, 8, 8)
    out = assemble_patches(patches, grid)[0, 0]
    assert out[0, 0] == 0 and out[0, 11] == 1 and out[11, 0] == 2 and out[11, 11] == 3
    assert out[0, 6] == 0.5  # rows 0-3, columns 4-7: patches 0 and 1
    assert out[6, 6] == 1.5  # centre: all four


def test_grid_rejects_uncovered_pixels_and_oversized_patches() -> None:
    with pytest.raises(ValueError, match="uncovered"):
        PatchGrid(32, 32, 8, 9)
    with pytest.raises(ValueError, match="exceeds"):
        PatchGrid(16, 16, 32, 8)


def test_parallel_cascaded_pooling_is_three_times_global_max() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 5, 7, 6)
    head = ParallelCascadedPooling(cascade_kernel=2)
    out = head(features)
    gmp = global_max_pool(features)
    assert out.shape == (2, 3 * gmp.shape[1])
    torch.testing.assert_close(out[:, :5], gmp)
    torch.testing.assert_close(out[:, 5:10], features.mean((2, 3)))
    # cascade: 2x2 max pooling (ceil mode: 4 x 3 cells) then the average of the cells
    cells = torch.nn.functional.max_pool2d(features, 2, 2, ceil_mode=True)
    assert cells.shape[-2:] == (4, 3)
    torch.testing.assert_close(out[:, 10:], cells.mean((2, 3)))
    # a 1x1 map: all three poolings agree
    one = torch.randn(2, 5, 1, 1)
    torch.testing.assert_close(head(one), one.flatten(1).repeat(1, 3))
