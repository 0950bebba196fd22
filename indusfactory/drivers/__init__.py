"""Drivers and masks: the topological driver a ControlNet follows, synthetic crack masks, augmentations."""
