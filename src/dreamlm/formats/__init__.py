"""Other file formats a model can come in or go out as (GGUF): read into, and written from, Dream-format directories."""
