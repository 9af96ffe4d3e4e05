"""Applications built on the jaxquant core: reference models, text corpora, evaluation,
benchmarks, serving helpers for the reference models, and the command line. The core never
imports them."""
