import sys

from trainer.prepare.run import main

sys.exit(main())
