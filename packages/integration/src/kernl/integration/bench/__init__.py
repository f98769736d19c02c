"""``kernl bench``: kernl against what a user would otherwise run, on a Bert-base grid (GPU), or the
embedded small-Bert correctness check through Triton's interpreter (CPU)."""
