"""Assess layer: is the tuned model good enough, and does it survive export? The PoC checks.

Owns: :mod:`.evaluate` (loss, perplexity, accuracy, exact match and ROUGE-L, base vs adapted), :mod:`.chat`
(A/B chat, streamed), :mod:`.parity` (the same prompts through two models, compared), :mod:`.destination`
(where an export may write) < :mod:`.export` (merged / PEFT / GGUF exports with a parity check) and
:mod:`.gguf_export`. May import common, core, planning, nn, integrations, assets, measure, train and ledger;
never app or widgets.
"""
