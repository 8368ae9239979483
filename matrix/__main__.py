from matrix.cli import main
from matrix.errors import exit_with

exit_with(main)
