"""`python -m cvfm` and `accelerate launch -m cvfm`."""

from cvfm.cli.app import main

main()
