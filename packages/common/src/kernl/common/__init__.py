"""kernl.common: the launch helpers and argument checks shared by every kernl kernel package."""
