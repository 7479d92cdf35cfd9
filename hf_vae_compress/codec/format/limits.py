"""The largest values a container may hold: what a reader allocates at most for a header's word.

The codec's configuration is checked against the same limits (:mod:`..config`), so nothing is
written that a reader would refuse.
"""

MAX_HEADER_BYTES = 64 << 20  # decompressed JSON header: far above any real model's, bounds a zip bomb
MAX_NUMEL = 1 << 34  # values per tensor and per model
MAX_CHUNK_SIZE = 4096  # values per chunk: the latent dimension of a coded tensor
MAX_HIDDEN_SIZE = 1 << 16  # the VAE's hidden width
MAX_TENSOR_DIMS = 8
