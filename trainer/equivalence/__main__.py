from matrix.errors import exit_with
from trainer.equivalence.run import main

exit_with(main)
