# Metadata lives in setup.cfg; this file exists for editable installs with older pip.
from setuptools import setup

setup()
