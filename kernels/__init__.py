"""Attention ops over a paged KV cache.

- kernels.reference: pure torch. The oracle the Triton kernels are tested against, and the
  building blocks of the engine's CPU attention backend.
- kernels.triton_attention: Triton kernels (write K/V by slot mapping; paged attention for
  decodes and for variable-length prefill chunks over cached context).

Nothing is imported here on purpose: libraries that probe for an installed package named
`kernels` (transformers does) may import this one, and must not pay for torch or triton.
"""
