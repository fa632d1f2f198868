"""QLoRA training from the spec on the quantized model (`make train-N`), steps top to bottom in __main__.py.

Modules: targets (which modules get LoRA), schedule (learning-rate factors),
plan (the 4090 projection and the budget), model (base + LoRA), loop (the
optimizer step), checkpoint (resumable state), curves (the PNG). Importing this
package loads no torch: the spec uses `targets`.
"""
