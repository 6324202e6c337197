"""Strategies 1 and 2: fine-tuning a backbone on data far from ImageNet, writing checkpoints that
``featx extract --checkpoint`` embeds into the same cache and comparison."""
