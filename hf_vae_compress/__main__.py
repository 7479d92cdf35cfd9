"""``python -m hf_vae_compress`` (and ``accelerate launch -m hf_vae_compress``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
