"""`python -m speech2image` runs the CLI."""

from speech2image.cli import main

main()
