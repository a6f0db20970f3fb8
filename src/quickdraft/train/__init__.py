"""``quickdraft train``: self-distilled training of EAGLE-style and Medusa heads (:mod:`quickdraft.heads`)."""
