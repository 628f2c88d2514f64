"""`python -m migration ...`: the same command line as `kms-migrate` (how workers start)."""

from .cli import main

if __name__ == "__main__":
    main()
