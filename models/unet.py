"""The project's U-Net, one class for 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import layers
from models.layers import NormName


class DoubleConv(nn.Sequential):
    """Two (convolution, normalisation, ReLU) blocks.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input feature maps.
        out_channels: output feature maps of both convolutions.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: NormName) -> None:
        super().__init__(
            layers.conv(spatial_dims, in_channels, out_channels),
            layers.norm(spatial_dims, norm, out_channels),
            nn.ReLU(inplace=True),
            layers.conv(spatial_dims, out_channels, out_channels),
            layers.norm(spatial_dims, norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Transposed-convolution upsampling, skip concatenation, then a DoubleConv.

    The upsampled map is zero-padded to the skip connection's size, so inputs
    whose sizes are not powers of two (odd sizes) still line up.

    Args:
        spatial_dims: 2 or 3.
        in_channels: feature maps coming from the coarser level.
        out_channels: feature maps of the skip connection and of the output.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: NormName) -> None:
        super().__init__()
        self.up = layers.up_conv(spatial_dims, in_channels, out_channels)
        self.conv = DoubleConv(spatial_dims, 2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Pooling rounded odd sizes down; pad back up (last axis first, as F.pad expects).
        pad: list[int] = []
        for up_size, skip_size in zip(reversed(x.shape[2:]), reversed(skip.shape[2:])):
            pad += [0, skip_size - up_size]
        if any(pad):
            x = F.pad(x, pad)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net for 2D or 3D segmentation.

    Per level a :class:`DoubleConv`, 2x max-pool downsampling, a bottleneck
    DoubleConv, transposed-convolution upsampling with skip connections by
    concatenation, and a final 1x1 convolution to ``out_channels`` logits.

    Input requirements: a tensor of shape ``(N, in_channels, *spatial)`` with
    ``spatial_dims`` spatial axes, each at least ``2 ** (len(features) - 1)``
    voxels so that the bottleneck keeps one voxel. Any size above that works,
    odd sizes included; the output has the input's spatial size. Sizes that are
    multiples of ``2 ** (len(features) - 1)`` avoid padding inside the network.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (imaging modalities).
        out_channels: output channels (classes, background included).
        features: feature maps per level, finest first; the last entry is the
            bottleneck. At least two entries.
        norm: ``"batch"`` or ``"instance"`` normalisation.
        deep_supervision: in training mode, also return logits from the coarser
            decoder levels (see :meth:`forward`). Evaluation mode always
            returns only the full-resolution logits.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256),
        norm: NormName = "instance",
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if len(features) < 2:
            raise ValueError(f"features needs at least two levels, got {list(features)}")
        self.spatial_dims = spatial_dims
        self.features = tuple(int(f) for f in features)
        self.deep_supervision = deep_supervision
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in self.features:
            self.encoders.append(DoubleConv(spatial_dims, channels, width, norm))
            channels = width
        self.pool = layers.max_pool(spatial_dims)
        # Decoder blocks from the coarsest to the finest level.
        self.decoders = nn.ModuleList(
            UpBlock(spatial_dims, self.features[i + 1], self.features[i], norm)
            for i in reversed(range(len(self.features) - 1))
        )
        self.head = layers.conv(spatial_dims, self.features[0], out_channels, kernel_size=1)
        # One auxiliary head per decoder level below the finest, coarsest first.
        self.aux_heads = nn.ModuleList(
            layers.conv(spatial_dims, self.features[i], out_channels, kernel_size=1)
            for i in reversed(range(1, len(self.features) - 1))
        ) if deep_supervision else nn.ModuleList()

    @property
    def min_size(self) -> int:
        """The smallest spatial size along each axis that the network accepts."""
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x``.

        Args:
            x: ``(N, in_channels, *spatial)``.

        Returns:
            Logits ``(N, out_channels, *spatial)``. With deep supervision in
            training mode, a list: the full-resolution logits first, then the
            coarser decoder levels' logits, finest to coarsest.
        """
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D tensor (N, C, {self.spatial_dims} spatial axes), "
                f"got shape {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"every spatial size must be >= {self.min_size} for {len(self.features)} levels, "
                f"got {tuple(x.shape[2:])}"
            )
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip connection
        aux: list[torch.Tensor] = []
        for level, decoder in enumerate(self.decoders):
            x = decoder(x, skips.pop())
            if self.training and level < len(self.aux_heads):
                aux.append(self.aux_heads[level](x))
        out = self.head(x)
        if self.training and self.deep_supervision:
            return [out, *reversed(aux)]
        return out
