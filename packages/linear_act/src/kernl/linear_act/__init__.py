"""kernl.linear_act: placeholder, see the package README."""
