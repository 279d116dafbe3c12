"""Measurement operators for inverse problems (survey §6): y = A(x) + noise on images in [-1, 1]."""
