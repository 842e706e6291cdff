"""`python -m cli ...` is the same as `lifelong ...`."""

from cli.main import main

main()
