"""extract_patches against a naive per-pixel reference; the PatchSource protocol."""

from __future__ import annotations

import pytest
import torch

from ats_wsi.patches import PatchSource, TensorPatchSource, extract_patches


def naive_extract(x: torch.Tensor, top_left: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.full((b, top_left.shape[1], c, size, size), fill, dtype=x.dtype)
    for i in range(b):
        for n in range(top_left.shape[1]):
            y0, x0 = top_left[i, n].tolist()
            for dy in range(size):
                for dx in range(size):
                    if 0 <= y0 + dy < h and 0 <= x0 + dx < w:
                        out[i, n, :, dy, dx] = x[i, :, y0 + dy, x0 + dx]
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_matches_naive_reference_with_fill(channels: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, channels, 13, 17, generator=gen)
    top_left = torch.randint(-7, 19, (2, 9, 2), generator=gen)
    # Make sure every case is present: inside, straddling each border, completely outside.
    top_left[0, :4] = torch.tensor([[2, 3], [-3, 14], [10, -2], [30, 30]])
    out = extract_patches(x, top_left, 5, fill=-1.0)
    assert out.shape == (2, 9, channels, 5, 5)
    assert torch.equal(out, naive_extract(x, top_left, 5, -1.0))
    assert (out[0, 3] == -1).all()  # fully outside
    assert (out[0, 0] != -1).all()  # fully inside


def test_gradient_counts_covering_patches() -> None:
    x = torch.rand(1, 2, 6, 7, requires_grad=True)
    top_left = torch.tensor([[[0, 0], [1, 1], [-2, 5], [4, 4]]])
    extract_patches(x, top_left, 3).sum().backward()
    expected = torch.zeros(6, 7)
    for y0, x0 in top_left[0].tolist():
        expected[max(y0, 0) : y0 + 3, max(x0, 0) : x0 + 3] += 1
    assert torch.equal(x.grad[0, 0], expected)
    assert torch.equal(x.grad[0, 1], expected)


def test_rejects_bad_shapes() -> None:
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError):
        extract_patches(x[0], torch.zeros(2, 3, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError):
        extract_patches(x, torch.zeros(3, 3, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError):
        extract_patches(x, torch.zeros(2, 3, 2, dtype=torch.long), 0)


def test_tensor_patch_source_satisfies_protocol() -> None:
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    src = TensorPatchSource(x, patch_size=4, fill=7.0)
    assert isinstance(src, PatchSource)
    assert src.shape == (10, 12) and src.patch_size == 4
    top_left = torch.tensor([[[0, 0], [8, 10]], [[-1, 3], [5, 5]]])
    assert torch.equal(src.extract(top_left), extract_patches(x, top_left, 4, fill=7.0))
    assert not isinstance(object(), PatchSource)


def test_integer_images_keep_their_dtype() -> None:
    x = torch.randint(0, 255, (1, 3, 9, 9), dtype=torch.uint8)
    out = extract_patches(x, torch.tensor([[[-2, -2]]]), 4, fill=255)
    assert out.dtype == torch.uint8
    assert torch.equal(out, naive_extract(x, torch.tensor([[[-2, -2]]]), 4, 255))


def test_window_path_and_pixel_path_agree() -> None:
    # x without grad takes the window view (+ per-pixel fix-up at the border); with grad, the
    # per-pixel gather for every box. Both must give the same patches.
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 30, 25, generator=gen)
    top_left = torch.randint(-6, 28, (2, 40, 2), generator=gen)
    fast = extract_patches(x, top_left, 6, fill=0.5)
    slow = extract_patches(x.clone().requires_grad_(True), top_left, 6, fill=0.5)
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())
    assert torch.equal(fast, naive_extract(x, top_left, 6, 0.5))


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_every_path_matches_reference(contiguous: bool, grad: bool) -> None:
    # Small image (patch larger than it) and large image, planes contiguous or transposed,
    # with and without gradient: every strategy in extract_patches gives the naive result.
    gen = torch.Generator().manual_seed(3)
    for hw, size in (((6, 8), 10), ((23, 19), 5)):
        x = torch.rand(2, 2, *hw, generator=gen)
        if not contiguous:
            x = torch.rand(2, 2, hw[1], hw[0], generator=gen).transpose(-1, -2)
        top_left = torch.randint(-size, max(hw), (2, 12, 2), generator=gen)
        out = extract_patches(x.clone().requires_grad_(grad), top_left, size, fill=-1.0)
        assert torch.equal(out.detach(), naive_extract(x, top_left, size, -1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 64, 80, generator=gen)
    top_left = torch.randint(-10, 75, (2, 50, 2), generator=gen)
    cpu = extract_patches(x, top_left, 12, fill=1.0)
    gpu = extract_patches(x.cuda(), top_left.cuda(), 12, fill=1.0)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
