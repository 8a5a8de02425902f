"""Knowledge distillation of the federated teacher into small students (losses and the module)."""
