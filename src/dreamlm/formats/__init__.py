"""Other file formats a model can come in (GGUF), read into Dream-format directories."""
