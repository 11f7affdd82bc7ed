"""Tools for verifying a runtime against another, value by value.

- `dump`: every intermediate tensor of one forward pass, saved to a documented .npz layout
  under llama.cpp's graph names (with the matching HF transformers module names beside them).
- `compare`: two dumps side by side: NMSE, errors, cosine per tensor; agreement and KL
  divergence of the logits; the first tensor, in graph order, where they part.
- `perplexity`: llama.cpp's perplexity over a text (same chunking, same uncertainty).
- `kld`: llama.cpp's `--kl-divergence-base` file (uint16-compressed log-probabilities) and
  the KL-divergence statistics llama-perplexity prints, plus the exact KLD from float logits.

Every function takes the model it runs (anything with `forward(ids, cache, trace=...)`) and a
way to make a fresh KV cache, so the same code verifies any compute mode of the runtime.
"""
