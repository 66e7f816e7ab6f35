"""Show-Attend-Tell training: model, vocabulary, checkpoints, data and the training loop."""
