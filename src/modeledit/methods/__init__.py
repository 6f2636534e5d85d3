"""Editing methods: one file per family; importing this package registers them all."""

from . import (
    enn,  # noqa: F401
    ft,  # noqa: F401
    grace,  # noqa: F401
    ke,  # noqa: F401
    memit,  # noqa: F401
    mend,  # noqa: F401
    rome,  # noqa: F401
    serac,  # noqa: F401
    wise,  # noqa: F401
)
