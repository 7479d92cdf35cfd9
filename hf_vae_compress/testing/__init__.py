"""Helpers for testing code built on hf_vae_compress: the loopback Hub server.

Shared by ``tests/`` and ``benchmarks/`` (like ``transformers.testing_utils``). Nothing in the
package's normal import path imports this subpackage: ``import hf_vae_compress`` never starts or
loads a test server.
"""
