"""Native kernels for backends where XLA lacks a fused op (today: attention on CPU).

Sources ship with the package and are compiled on first use with the local C++
compiler (see `cpu_attention.py`); nothing is downloaded.
"""
