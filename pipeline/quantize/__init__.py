"""`make quantize-N`: the spec's base model -> a GPTQ artifact in the Qwen2 layout, plus a report.

Steps, in `__main__.py` top to bottom: resolve the base model (converting Qwen
v1 first), draw the calibration windows exactly as the reference did, project
memory and time on one RTX 4090, run GPTQ, score held-out perplexity before and
after, and move the finished artifact into place.
"""
