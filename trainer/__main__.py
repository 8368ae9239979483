from matrix.errors import exit_with
from trainer.cli import main

exit_with(main)
