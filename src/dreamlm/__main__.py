"""`python -m dreamlm` runs the command line."""

from dreamlm.cli import main

main()
