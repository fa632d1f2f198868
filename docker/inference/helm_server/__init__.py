"""HELM `neurips/local` inference server shipped in every submission zip."""

import os

# The server runs eagerly. Libraries it loads may wrap code in torch.compile (GPTQModel does,
# for its torch kernel), which needs a C compiler at the first call: a request would fail
# with a 500 in an image without one. Set before torch is imported, so every thread sees it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
