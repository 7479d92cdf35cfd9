"""``python -m hf_vae_compress`` (and ``accelerate launch -m hf_vae_compress``) runs the CLI."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (as the import-order test does) runs nothing
    sys.exit(main())
