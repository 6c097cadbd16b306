"""Dataset layouts, label spaces, the synthetic benchmark and resizing."""
