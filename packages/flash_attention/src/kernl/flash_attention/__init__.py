"""kernl.flash_attention: placeholder, see the package README."""
