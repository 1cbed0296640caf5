"""Training: objectives, data, the train loop (single process or torchrun + FSDP2), AR -> diffusion conversion."""
