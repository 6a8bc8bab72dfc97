"""Generation on top of a backend: prompt assembly, sampling, streaming, stopping."""
