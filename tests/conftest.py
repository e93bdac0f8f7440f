import hypothesis

# JIT compilation makes first examples slow; deadlines would flake on a loaded 2-core machine.
hypothesis.settings.register_profile("default", deadline=None, max_examples=15)
hypothesis.settings.load_profile("default")


# tests/multidevice/ needs 8 virtual devices, fixed when jax initialises: it runs in its own
# process through tests/test_multidevice.py, never in this one.
collect_ignore = ["multidevice"]
