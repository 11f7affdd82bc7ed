"""Training in NumPy: backward passes written by hand, the gradient of a batch on several cores,
and what is built on them (an optimizer and training loop, LoRA fine-tuning, pruning, distillation).

| module     | what                                                                              |
|------------|-----------------------------------------------------------------------------------|
| `backward` | the backward of each forward step (linear, embedding, RMSNorm, RoPE, attention, SwiGLU) |
| `losses`   | cross-entropy and the distillation KL, each with its gradient                      |
| `tape`     | the weights as training holds them (trained, frozen packed, LoRA) and one pass's record |
| `model`    | a model to train: the loader's weights, the forward pass of minillm.arch on a tape |
| `llama`, `gemma3`, `qwen3` | each architecture's backward, step by step against its forward in minillm.arch |
| `common`   | what those backwards share: the LM head and final norm, Q and K normed per head   |
| `grad`     | the gradient of a batch of windows, split over threads                              |
| `optim`    | AdamW, the warm-up and cosine schedule, gradient clipping                          |
| `data`     | token windows from text files, chat examples scored on the answer, seeded batches  |
| `loop`     | the training loop: progress bar, held-out evaluation, checkpoints, peak memory     |
| `evaluate` | held-out perplexity and KL against a base, with minillm.verify's code               |
| `checkpoint` | GGUF files out: a model with its source's metadata, written under a temporary name |
"""
