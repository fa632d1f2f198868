"""`make eval-N`: HELM itself (helm-run, helm-summarize) against a submission's container, and its report."""
