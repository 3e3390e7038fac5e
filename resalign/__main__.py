"""``python -m resalign`` is the ``resalign`` command."""

from resalign.cli import main

if __name__ == "__main__":
    main()
