"""kernl's own decode loop for ``generate()``: token choice and stopping on the GPU, capturable in CUDA graphs."""
