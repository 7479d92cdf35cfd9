"""The container format: every line that fixes a container's bytes and what they mean.

Changing what any module here computes, for bytes already written, changes how existing files
decode: that needs a new format version (a new reader module in :mod:`.registry`), never an edit.
``tests/test_format_pins.py`` and ``tests/test_container_v1.py`` pin the decoded bits of every
committed container.

* :mod:`.framing`: the safetensors file, its metadata key and zlib header, and the folder's file name;
* :mod:`.integrity`: checksums of stored and decoded bytes, and the two integrity errors;
* :mod:`.limits`: the largest values a header may name (the codec's config is checked against them);
* :mod:`.layout`: chunk geometry, chunks back to tensors;
* :mod:`.grid`: row scales, stored steps, float symbols;
* :mod:`.identity`: the identity transform's decode arithmetic;
* :mod:`.linear`: the portable VAE's (``vae-int``) decode arithmetic: int16 maps, a float product
  exact by a bound proved before decoding;
* :mod:`.streams`: pcodec entropy coding;
* :mod:`.fields`: checked reads of header fields, shared by the readers;
* :mod:`.v1` (frozen, read only), :mod:`.v2` (written), :mod:`.registry` (which reads which).

The float VAE transform's (``vae``) decoder is a float network (:mod:`..transform`) whose weights
each container stores: its output bits depend on the machine, which is why such containers are not
portable. The portable VAE's (``vae-int``) decoder is integer arithmetic (:mod:`.linear`): its
containers are verified everywhere, like the identity's.

This package's ``__init__`` imports nothing, so the pipeline's early stages can use the leaf
modules (layout, grid) without loading the readers.
"""
