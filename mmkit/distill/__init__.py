"""Knowledge distillation methods of ``mmkit distill`` (distill.md): ``dcd`` so far."""
