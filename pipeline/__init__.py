"""The model stages: a spec's base model becomes the artifacts a submission serves.

Each stage has a home of its own (`convert`, `quantize`, ...), reads the spec and
the previous stage's output folder, and writes one folder of its own.
"""
