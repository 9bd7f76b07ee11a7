"""``python -m pagkit`` (also ``torchrun -m pagkit eval ...``): the ``pagkit`` command line."""

from pagkit.cli import main

if __name__ == "__main__":
    main(prog_name="pagkit")
