"""The package's version and its name on the package index.

The import package and the command are `indexer`; the distribution is `indexer-lancedb`, because
`indexer` on PyPI is an unrelated project (`pip install indexer` fetches that one).
"""

DISTRIBUTION = "indexer-lancedb"
__version__ = "0.1.0"
