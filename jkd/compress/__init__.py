"""Compression of trained models: pruning (`pruning`), quantization (`quant`), export (`export`)."""
