"""Real operator kernels, one small module per family. Each builds inputs for a shape on a device
and returns a zero-argument callable that launches the kernel. torch is imported lazily."""
