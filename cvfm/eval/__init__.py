"""Evaluations of frozen encoders: k-NN and linear probes."""
