"""Training infrastructure. Importing this package installs the start-up error boundary
(utils/errors.py): every entry point imports a package of ours before torch, so a Ctrl-C or a
missing dependency while the imports load is one line too."""

from utils.errors import install_startup_boundary

install_startup_boundary()
