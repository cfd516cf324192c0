"""Kernels no serving path uses: measured in docs/overlap.md, kept for the overlap work."""
