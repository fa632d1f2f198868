"""HELM `neurips/local` inference server shipped in every submission zip."""
