"""``python -m tl_multimodal``: the same entry point as the ``tl-multimodal`` command."""

import sys

from tl_multimodal.cli import main

sys.exit(main())
