import sys

from trainer.equivalence.run import main

sys.exit(main())
