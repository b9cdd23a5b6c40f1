"""``python -m tl_multimodal COMMAND ...``: the same commands as ``tl-multimodal``."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["attribute"]:
        from tl_multimodal.runner import main_attribute

        main_attribute(sys.argv[2:])
    else:
        from tl_multimodal.cli import main

        main(sys.argv[1:])
