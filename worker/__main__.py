"""`python -m worker` runs the command line, exactly as `vmdk-migrate` does."""

from worker.cli.commands import main

if __name__ == "__main__":
    main()
