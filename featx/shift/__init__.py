"""What makes figures optimistic (the audit: shift between splits, leaked near-duplicates, label errors)
and the remedies that adapt to unlike test images without reading their labels. torch-free."""
