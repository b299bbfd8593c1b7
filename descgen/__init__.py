"""descgen: LLM-generated, schema-validated, versioned banks of spurious descriptors.

    from descgen import load_bank; bank = load_bank("banks/v2.yaml")

Importing descgen pulls in neither torch nor transformers; descgen.llm loads them lazily.
"""

__version__ = "0.1.0"

from descgen.bank import load_bank
from descgen.schema import Bank, Concept, Descriptor

__all__ = ["Bank", "Concept", "Descriptor", "__version__", "load_bank"]
