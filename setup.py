from setuptools import setup

# The Twisted plugin lives in the twisted.plugins namespace, which has no
# __init__.py of ours: list it as a module so that it is installed.
setup(py_modules=["twisted.plugins.socks4tx_plugin"])
