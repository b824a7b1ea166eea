"""Virtual machine introspection: memory backends, kernel profiles, walkers."""
