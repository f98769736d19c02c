"""kernl.integration: the user-facing layer that composes the kernl kernels."""
