"""Training: objectives (masked / next token), the loop, checkpoints, data-parallel wrapping."""
from maskgil.training.loop import (Hooks, NonFiniteLossError, TrainConfig, batch_plan, build_optimizer, compile_blocks,
                                   cpu_compile_available, fit, grid_at, list_checkpoints, load_checkpoint, lr_at,
                                   prune_checkpoints, save_checkpoint, train_step)
from maskgil.training.objectives import (LossOutput, compute_loss, masked_token_loss, next_token_loss,
                                         random_token_mask)

__all__ = [
    "Hooks", "NonFiniteLossError", "TrainConfig", "batch_plan", "build_optimizer", "compile_blocks",
    "cpu_compile_available", "fit", "grid_at", "list_checkpoints", "load_checkpoint", "lr_at", "prune_checkpoints",
    "save_checkpoint", "train_step",
    "LossOutput", "compute_loss", "masked_token_loss", "next_token_loss", "random_token_mask",
]
