"""`python -m facegender` (and `torchrun -m facegender`) runs the command line."""

from facegender.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
