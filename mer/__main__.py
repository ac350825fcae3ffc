import sys

from mer.cli import main

sys.exit(main())
