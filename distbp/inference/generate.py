"""Text from a trained sequence model: autoregressive sampling with temperature and top-k (`distbp generate`)."""
from __future__ import annotations

import numpy as np

from ..datasets.text import Vocabulary
from ..errors import UserError


def next_token(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One id drawn from softmax(logits / temperature) over the top_k largest; temperature 0 takes the argmax."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < len(z):
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(z) - 1))


def sample(model, prompt: np.ndarray, tokens: int, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0) -> np.ndarray:
    """prompt followed by `tokens` sampled ids; the model sees the last T ids (its context) each time."""
    T = model.input_shape[0]
    ids, rng = list(int(i) for i in prompt), np.random.default_rng(seed)
    window = np.zeros((1, T), np.int64)  # positions after the context's end do not reach it (causal)
    model.eval()
    for _ in range(tokens):
        context = ids[-T:]
        window[0, :len(context)] = context
        logits = model.forward(window)[0, len(context) - 1]  # (V,): the next token after the context
        ids.append(next_token(logits, temperature, top_k, rng))
    return np.array(ids, np.int64)


def check_options(tokens: int, temperature: float, top_k: int | None) -> None:
    """UserError naming the option that is out of range."""
    if tokens < 0:
        raise UserError(f"--tokens {tokens} must be >= 0, the number of tokens to generate")
    if not temperature >= 0:
        raise UserError(f"--temperature {temperature} must be >= 0 (0: always the likeliest token)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k} must be >= 1 (or left out: every token)")


def generate_text(model, vocab: Vocabulary, prompt: str, tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0) -> str:
    """The prompt and its continuation of `tokens` tokens, decoded; an empty prompt starts from a newline."""
    check_options(tokens, temperature, top_k)
    start = vocab.encode(prompt or "\n")
    if len(start) == 0:
        raise UserError("the prompt encodes to no tokens; give --prompt some text")
    ids = sample(model, start, tokens, temperature, top_k, seed)
    return (prompt or "") + vocab.decode(ids[len(start):])
