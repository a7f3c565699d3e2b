"""Built-in channel rules for torch operators and torch.nn layers."""
