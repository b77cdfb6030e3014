import sys

from qdqapp.cli import main

sys.exit(main())
