import sys

from qlora_inject.cli import main

sys.exit(main())
