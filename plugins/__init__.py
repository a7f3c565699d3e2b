"""Built-in architecture plugins for surgery (import name ``surgery_plugins``)."""
