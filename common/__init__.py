"""Thin shared plumbing: datasets, augmentations, backbones, config parsing, run folder, kNN.

Nothing here knows about a method: losses, gathers, EMA, queues and schedules live in the method scripts.
"""
