"""`lora-workbench bench`: the workbench against plain TRL, and its report."""
