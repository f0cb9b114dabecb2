"""A user's own package, as tests import it: ``tests.user_pkg.mymodel:build`` from the repository."""
