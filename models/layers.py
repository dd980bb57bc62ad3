"""One factory for the layers whose class depends on the spatial dimension.

MONAI's layer factories already map ``(kind, spatial_dims)`` to the right
``torch.nn`` class; this module narrows them to what the U-Net uses so that the
network code never names a 2D or 3D class itself.
"""

from __future__ import annotations

from typing import Literal

from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

NormName = Literal["batch", "instance"]
_NORMS = {"batch": Norm.BATCH, "instance": Norm.INSTANCE}


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """A same-padded convolution.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input feature maps.
        out_channels: output feature maps.
        kernel_size: odd kernel size; padding keeps the spatial size.
    """
    _check_dims(spatial_dims)
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
