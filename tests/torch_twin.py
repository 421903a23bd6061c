"""A distbp Sequential rebuilt in torch.nn (float64) with the same parameters, blocks included: the test-only reference."""
import numpy as np


def twin(model, torch):
    """(module, pairs): the network in torch.nn and [(distbp name, torch parameter, to_distbp)] in flat order."""
    pairs = []
    module = _chain(torch, model.layers, [path for path, key, _ in model.units if len(key) == 1], model, pairs)
    return module, pairs


def _chain(torch, layers, paths, model, pairs):
    """torch.nn.Sequential of the layers (their distbp paths given)."""
    return torch.nn.Sequential(*[_module(torch, layer, path, model, pairs) for layer, path in zip(layers, paths)])


def _block(torch, layer, path, model, pairs):
    """A torch module running the block's chains, summed (residual) or joined on dim 1 (concat)."""
    chains = [_chain(torch, chain.layers, [f"{path}.{layer.kind}.{name}.{j}" for j in range(len(chain.layers))],
                     model, pairs) for name, chain in layer.chains()]

    class Fork(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind, self.paths = kind, torch.nn.ModuleList(chains)

        def forward(self, x):
            outs = [p(x) for p in self.paths]
            return sum(outs[1:], outs[0]) if self.kind == "residual" else torch.cat(outs, dim=1)

    return Fork(layer.kind)


def _module(torch, layer, path, model, pairs):
    """The torch module of one distbp layer; its parameters are set from distbp's and listed in pairs."""
    f64 = torch.float64
    if hasattr(layer, "chains"):
        return _block(torch, layer, path, model, pairs)
    v = model.views(model.params)
    if layer.kind == "conv2d":
        m = torch.nn.Conv2d(layer.C, layer.F, (layer.kh, layer.kw), (layer.sh, layer.sw), (layer.ph, layer.pw),
                            bias=layer.bias, dtype=f64)
        _set(m.weight, v, f"{path}.conv2d.W", pairs, torch)
        if layer.bias:
            _set(m.bias, v, f"{path}.conv2d.b", pairs, torch)
        return m
    if layer.kind in ("batchnorm", "layernorm"):
        m = (torch.nn.BatchNorm2d(layer.C, dtype=f64) if layer.kind == "batchnorm" and len(layer.in_shape) == 3
             else torch.nn.BatchNorm1d(layer.C, dtype=f64) if layer.kind == "batchnorm"
             else torch.nn.LayerNorm(layer.norm_shape, eps=layer.eps, dtype=f64))
        _set(m.weight, v, f"{path}.{layer.kind}.W", pairs, torch)
        _set(m.bias, v, f"{path}.{layer.kind}.b", pairs, torch)
        return m
    if layer.kind == "linear":
        m = torch.nn.Linear(layer.d_in, layer.d_out, bias=layer.bias, dtype=f64)
        _set(m.weight, v, f"{path}.linear.W", pairs, torch, transpose=True)
        if layer.bias:
            _set(m.bias, v, f"{path}.linear.b", pairs, torch)
        return m
    if layer.kind == "maxpool2d":
        return torch.nn.MaxPool2d((layer.kh, layer.kw), (layer.sh, layer.sw))
    if layer.kind == "global_avgpool":
        return torch.nn.AdaptiveAvgPool2d(1)
    return {"relu": torch.nn.ReLU, "flatten": torch.nn.Flatten, "tanh": torch.nn.Tanh}[layer.kind]()


def _set(param, views, name, pairs, torch, transpose=False):
    """Copy distbp's parameter into the torch one; record how to read its gradient back in distbp's layout."""
    value = views[name].T if transpose else views[name]
    param.data = torch.tensor(np.array(value, dtype=np.float64))
    pairs.append((name, param, (lambda a: a.T) if transpose else (lambda a: a)))


def flat(pairs, what: str) -> np.ndarray:
    """The torch parameters ("data") or gradients ("grad") in distbp's flat order and layout."""
    return np.concatenate([to(getattr(p, what).detach().numpy()).ravel() for _, p, to in pairs])
