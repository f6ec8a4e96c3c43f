"""sdq: Sigma-Delta quantization of LLM weights to 1 and 1.58 bits, with add-only kernels."""
