"""The one path from decoder output to uint8 pixels, grids and PNG files."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskgil.images import image_grid, png_bytes, save_png, to_uint8_nhwc


def test_to_uint8_nhwc_rounds_like_the_metrics_and_refuses_out_of_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    u8 = to_uint8_nhwc(x)
    assert u8.shape == (1, 2, 2, 3) and u8.dtype == np.uint8
    assert u8[0, :, :, 0].tolist() == [[0, 128], [255, 191]]  # (v+1)*127.5 rounded half to even: 0, 128, 255, 191
    nhwc = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8_nhwc(nhwc), nhwc)  # uint8 passes through, layout kept
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_uint8_nhwc(torch.full((1, 3, 2, 2), 1.5))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # a diverged decoder's NaN is not a black pixel
        to_uint8_nhwc(torch.tensor([0.0, float("nan"), 0.5, 0.1]).view(1, 1, 2, 2).expand(1, 3, 2, 2))


def test_image_grid_places_each_image_row_major_inside_white_gutters(tmp_path):
    imgs = np.arange(5 * 4 * 3 * 3, dtype=np.uint8).reshape(5, 4, 3, 3)  # 5 images of 4x3
    grid = image_grid(imgs, pad=1)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (3 + 1) + 1, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    for i in range(5):
        r, c = divmod(i, 3)
        assert np.array_equal(grid[1 + 5 * r:5 + 5 * r, 1 + 4 * c:4 + 4 * c], imgs[i])
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[6:10, 9:12] == 255).all()  # border, empty cell
    assert image_grid(imgs, ncol=5, pad=0).shape == (4, 15, 3)
    back = np.array(Image.open(io.BytesIO(png_bytes(grid))))
    assert np.array_equal(back, grid)
    path = save_png(grid, tmp_path / "deep" / "grid.png")
    assert np.array_equal(np.array(Image.open(path)), grid)
