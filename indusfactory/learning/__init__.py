"""Learning: model loading, the shared training loop, the concept (LoRA) and the condition (ControlNet)."""
