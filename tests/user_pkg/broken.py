"""A user module whose import fails: it needs a package that is not installed."""

import not_installed_dependency_xyz  # noqa: F401
