"""Editing methods: one file per family; importing this package registers them all."""

from . import ft  # noqa: F401
from . import mend  # noqa: F401
