"""The bundled model families, one module each; importing the package registers them.

A family declares its config.json model types, block, module names, checkpoint key map with
logical axes, and GGUF names in one `ModelFamily` (`pdpo_jax.model.family`). A family defined
elsewhere registers the same way, with `register_family`.
"""

from pdpo_jax.model.families import gpt2, llama  # noqa: F401
