"""LOMO and AdaLomo: updates fused into backward. ``core.FusedStep`` is the whole step; ``callback`` the Lightning glue."""
