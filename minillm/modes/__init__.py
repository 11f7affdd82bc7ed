"""Weight objects of the oracle and ggml compute modes (minillm.ops picks them per `--mode`):
OracleLinear multiplies exactly dequantized weights in float64, GGMLLinear as llama.cpp's CPU
backend does, both over the packed bytes the loader mapped or converted."""
