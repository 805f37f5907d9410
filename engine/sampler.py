"""Next-token choice for a batch of logits rows, each with its own SamplingParams.

Greedy rows take the argmax. Other rows: temperature, then top-k, then top-p on the
scaled logits, then a draw by the exponential race (argmax of probs / E with E ~ Exp(1),
which picks token i with probability probs[i]).

Seeded rows draw E from a generator seeded by (seed, index of the token in the output), not
from a running stream, so the same seed gives the same tokens whatever the batch, and a
request whose first token is sampled by a prefill worker and the rest by a decode worker
gets exactly what one engine would have given it.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def seed_for(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for token `index` of a request seeded with `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> list[int]:
        """logits [B, V] float32; output_index[i] = how many tokens row i's request has produced."""
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits.argmax(-1).tolist()
        tokens = logits.argmax(-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        sampled = self._sample(logits[rows], [params[i] for i in rows], [output_index[i] for i in rows])
        tokens[rows] = sampled
        return tokens.tolist()

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> torch.Tensor:
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperature[:, None]
        vocab = logits.shape[-1]
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]  # a top_k past the vocabulary keeps it all
        if any(k < vocab for k in top_k):
            k = torch.tensor(top_k, device=logits.device)
            kth = logits.topk(max(top_k), dim=-1).values.gather(-1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1 for p in params):
            logits = _top_p(logits, torch.tensor([p.top_p for p in params], device=logits.device))
        probs = logits.softmax(-1)
        noise = torch.empty_like(probs)
        for i, (p, index) in enumerate(zip(params, output_index)):
            if p.seed is None:
                noise[i].exponential_(generator=self.generator)
            else:
                g = torch.Generator(device=probs.device).manual_seed(seed_for(p.seed, index))
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(-1)


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False  # the most likely token always stays
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
