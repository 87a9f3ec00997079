"""Tiny plain-PyTorch example models used by fbcompile's tests and README (no fbcompile import)."""
