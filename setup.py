from setuptools import setup

# The Twisted plugins live in the twisted.plugins namespace, which has no
# __init__.py of ours: list them as modules so that they are installed.
setup(
    py_modules=[
        "twisted.plugins.socks4tx_plugin",  # twistd socks4
        "twisted.plugins.socks4tx_endpoints",  # clientFromString's socks4:
    ]
)
