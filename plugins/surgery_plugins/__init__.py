"""Built-in architecture plugins for surgery (import name ``surgery_plugins``)."""

import surgery  # noqa: E402,F401  (installs the aliases of the old module names)
