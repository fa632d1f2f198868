"""`make data-N`: a spec's [[training.data]] sources -> a tokenized, loss-masked training set.

One module per source reads its Hub files through `datasets` and yields
conversations (lists of rounds); `template.py` renders them byte for byte as
the spec says; `tokenize.py` tokenizes piece by piece and masks the loss;
`manifest.py` counts everything and refuses silent data loss. Steps, top to
bottom, in `__main__.py`.
"""
