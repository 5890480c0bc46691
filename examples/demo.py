"""Placeholder until the full demo lands."""

print("demo: not written yet")
