"""Files copied verbatim into every pushed repository (``modeling_*.py``): the ``trust_remote_code`` shim.

A package only so that it ships in the wheel; nothing here is imported by hf_vae_compress itself.
"""
