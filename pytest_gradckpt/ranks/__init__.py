"""Rank processes and their launch: isolated children, DDP/FSDP2 ranks, tensors held where they ran."""
