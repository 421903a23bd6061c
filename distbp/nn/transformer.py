"""The pre-LayerNorm transformer block as a container of two residual blocks (nanoGPT's Block):
x = x + attn(ln_1(x)), then x = x + mlp(ln_2(x)), mlp = linear(D -> mlp D), GELU, linear(mlp D -> D)."""

from .blocks import Block, Chain
from .layers import check_spec, register, spec_value


def block_specs(heads: int, width: int, mlp: int, dropout: float, attn_dropout: float, gelu: str) -> list[dict]:
    """The two residual specs of one block on inputs of width D (dropout after each branch when > 0)."""
    after = [{"type": "dropout", "p": dropout}] if dropout > 0 else []
    attn = [{"type": "layernorm", "dims": 1},
            {"type": "causal_self_attention", "heads": heads, "dropout": attn_dropout}, *after]
    ffn = [{"type": "layernorm", "dims": 1}, {"type": "linear", "out": mlp * width},
           {"type": "gelu", "approximate": gelu}, {"type": "linear", "out": width}, *after]
    return [{"type": "residual", "body": attn}, {"type": "residual", "body": ffn}]


@register("transformer_block")
class TransformerBlock(Block):
    """Pre-LN block x + attn(ln(x)), then x + mlp(ln(x)): two residual blocks (named ...layers.0.residual...)."""

    private_output = True
    private_dx = True

    def __init__(self, chain: Chain, specs: list[dict]):
        self.chain, self.out_shape = chain, chain.out_shape
        self.chain_specs = {"layers": specs}  # for describe(): the specs this block wrote

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index, seed: int):
        """Build from {"type": "transformer_block", "heads": 4[, "mlp": 4, "dropout": 0.0, "attn_dropout": 0.0,
        "gelu": "tanh"]} on (T, D)."""
        check_spec(spec, index, ("heads", "mlp", "dropout", "attn_dropout", "gelu"))
        if len(in_shape) != 2:
            raise ValueError(f"layer {index} (transformer_block) needs (T, D) inputs but gets shape "
                             f"{tuple(in_shape)}; put it after an embedding")
        width = in_shape[1]
        heads = spec_value(spec, index, "heads", int, ok=lambda v: v >= 1 and width % v == 0,
                           want=f">= 1 dividing the width {width}")
        mlp = spec_value(spec, index, "mlp", int, 4, lambda v: v >= 1, ">= 1, the hidden width / D")
        p = spec_value(spec, index, "dropout", float, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")
        p_att = spec_value(spec, index, "attn_dropout", float, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")
        gelu = spec_value(spec, index, "gelu", str, "tanh", lambda v: v in ("tanh", "none"),
                          'of "tanh" or "none" (exact erf)')
        specs = block_specs(heads, width, mlp, p, p_att, gelu)
        return cls(Chain.build(specs, in_shape, seed, f"{index}.{cls.kind}.layers"), specs)

    def chains(self) -> list:
        """[("layers", the two residual blocks)]."""
        return [("layers", self.chain)]

    def forward(self, x):
        """Both residual blocks in order."""
        return self.chain.forward(x)

    def backward(self, dy):
        """Back through both; dx unless need_dx is off."""
        return self.chain.backward(dy, self.need_dx)
