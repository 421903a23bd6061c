"""Sliding windows over (C, H, W) inputs, shared by convolution and pooling: spec pairs, output size, offsets."""


def pair(spec: dict, index: int, key: str, default=None, low: int = 1) -> tuple[int, int]:
    """Read spec[key] as an int or an [h, w] pair of ints >= low."""
    value = spec.get(key, default)
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair):
        raise ValueError(f"layer {index} ({spec['type']}): {key}={value!r} must be an int >= {low} "
                         f"or a pair [h, w] of them, e.g. {key} = {max(low, 2)}")
    return pair


def out_hw(spec: dict, index: int, in_shape: tuple, kernel, stride, padding=(0, 0)) -> tuple[int, int]:
    """Output (Ho, Wo) of (kh, kw) windows sliding with stride over the padded (H, W)."""
    if len(in_shape) != 3:
        raise ValueError(f"layer {index} ({spec['type']}) needs a (C, H, W) input but gets shape "
                         f"{tuple(in_shape)}; use it before any flatten or linear layer")
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_shape[1:], kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(f"layer {index} ({spec['type']}): kernel {list(kernel)} does not fit the "
                         f"input {tuple(in_shape)} with padding {list(padding)}; "
                         "use a smaller kernel or more padding")
    return out


def offsets(kh, kw, sh, sw, Ho, Wo):
    """For each window offset (i, j): the (rows, cols) slices of the input it reads for all outputs."""
    return [(slice(i, i + sh * Ho, sh), slice(j, j + sw * Wo, sw)) for i in range(kh) for j in range(kw)]
