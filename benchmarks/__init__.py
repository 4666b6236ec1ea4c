"""Benchmarks of peft_gates on real pretrained weights and real labelled text (see benchmarks/README.md).

A package so that ``python -m benchmarks.accuracy`` and the smoke tests can import the scripts; each
script also runs as a file (``python benchmarks/accuracy.py``).
"""
