"""Loading the base (bitsandbytes), the PEFT adapter config, the device plan, built-in models, checks."""
