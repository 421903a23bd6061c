"""The CIFAR ResNet of He et al. (2016, section 4.2) as nested layer specs: depth 6n + 2 (8, 14, 20, ...)."""


def _conv(channels: int, kernel: int, stride: int) -> dict:
    """A bias-free convolution keeping the spatial size at stride 1 (a norm layer follows it)."""
    return {"type": "conv2d", "out_channels": channels, "kernel": kernel, "stride": stride,
            "padding": (kernel - 1) // 2, "bias": False}


def basic_block(channels_in: int, channels: int, stride: int, norm: str = "batchnorm") -> dict:
    """relu(x + conv-norm-relu-conv-norm(x)); a 1x1 stride-s projection shortcut when the shape changes."""
    block = {"type": "residual", "body": [_conv(channels, 3, stride), {"type": norm}, {"type": "relu"},
                                          _conv(channels, 3, 1), {"type": norm}]}
    if stride != 1 or channels != channels_in:
        block["shortcut"] = [_conv(channels, 1, stride), {"type": norm}]
    return block


def resnet_specs(depth: int, classes: int, width: int = 16, norm: str = "batchnorm") -> list[dict]:
    """A 3x3 conv stem, three stages of (depth - 2) / 6 basic blocks at width, 2 width and 4 width channels
    (the 2nd and 3rd stage start with stride 2), global average pooling and a linear head of `classes`."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth {depth} must be 6n + 2 with n >= 1: 8, 14, 20, 32, 44, 56, 110")
    specs, channels = [_conv(width, 3, 1), {"type": norm}, {"type": "relu"}], width
    for stage in range(3):
        for b in range((depth - 2) // 6):
            out = width << stage
            specs += [basic_block(channels, out, 2 if stage and not b else 1, norm), {"type": "relu"}]
            channels = out
    return specs + [{"type": "global_avgpool"}, {"type": "flatten"}, {"type": "linear", "out": classes}]
