"""The comparison experiments behind ``aon-func compare`` and ``aon-func train``."""
