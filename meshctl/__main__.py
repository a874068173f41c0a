"""`python -m meshctl`: the same as the installed `meshctl` script."""

from meshctl.cli import main

main()
