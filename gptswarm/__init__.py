"""gptswarm: community training of one GPT by many volunteer machines.

Subpackages: mingpt_core (the GPT, tokenizers, data, trainer), coordinator, worker, proto.
"""

__version__ = "0.1.0"
