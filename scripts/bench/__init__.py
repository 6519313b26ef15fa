"""The pieces of scripts/bench.py: one module per benchmark (training, sampling, neighbors, empirical, geometry),
shared timing and data helpers (common), the reference figures (reference) and the command line (cli)."""
