import sys

from qdq.cli import main

sys.exit(main())
