"""`python -m hf_fsf ...` is `hf-fsf ...`."""

import sys

from hf_fsf.cli import main

sys.exit(main())
