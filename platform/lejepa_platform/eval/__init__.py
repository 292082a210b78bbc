"""Frozen-feature evaluation protocols and embedding geometry. Pure torch."""
