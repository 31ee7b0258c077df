"""Front doors for other libraries (imported lazily; ``import fpq_plugin`` never imports diffusers)."""
