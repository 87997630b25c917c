"""GPU execution: the decoder step runner, CUDA graphs, Triton kernels and fused regions."""
