"""One factory for the layers whose class depends on the spatial dimension.

MONAI's layer factories already map ``(kind, spatial_dims)`` to the right
``torch.nn`` class; this module narrows them to what the U-Net uses so that the
network code never names a 2D or 3D class itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

NormName = Literal["batch", "instance"]
_NORMS = {"batch": Norm.BATCH, "instance": Norm.INSTANCE}


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that trains in float32 where CPU bfloat16 autocast would give it wrong weight gradients.

    oneDNN's bfloat16 backward-weights kernel for a 3D convolution returns garbage when the input is two
    voxels deep and the kernel three (PyTorch 2.14, AMD Zen 4 with AVX-512 BF16: relative errors from 1 to
    1e37, or NaN, for inputs of 2x2x2, 2x8x8, 2x1x1 ...; depth 1 or 3 and more, the input gradient, 2D and
    transposed convolutions are right). A U-Net whose bottleneck is 2 voxels deep (head-and-neck CT: a 64^3
    patch pooled five times) hits it at every step. Such a layer is tiny, so it runs in float32 during
    training whenever its input is thinner than its kernel along any axis; inference (the forward pass
    alone, which is right) and every other layer keep bfloat16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and any(s < k for s, k in zip(x.shape[2:], self.kernel_size))):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """A same-padded convolution.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input feature maps.
        out_channels: output feature maps.
        kernel_size: odd kernel size; padding keeps the spatial size.
    """
    _check_dims(spatial_dims)
    if spatial_dims == 3:
        return Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def up_conv(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """A stride-2 transposed convolution that doubles every spatial size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input feature maps.
        out_channels: output feature maps.
    """
    _check_dims(spatial_dims)
    return Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=2, stride=2)


def max_pool(spatial_dims: int) -> nn.Module:
    """A 2x max-pooling that halves every spatial size (rounding down).

    Args:
        spatial_dims: 2 or 3.
    """
    _check_dims(spatial_dims)
    return Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)


def norm(spatial_dims: int, name: NormName, channels: int) -> nn.Module:
    """A normalisation layer with learnable affine parameters.

    Args:
        spatial_dims: 2 or 3.
        name: ``"batch"`` or ``"instance"``.
        channels: feature maps normalised.
    """
    _check_dims(spatial_dims)
    if name not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {name!r}")
    return Norm[_NORMS[name], spatial_dims](channels, affine=True)
