#!/usr/bin/env python3
"""Run ORP's mock Chat Completions upstream: `python scripts/mock_upstream.py --port 9000`.

Works with orp_proxy installed or straight from a checkout.
"""

from __future__ import annotations

import os
import sys

try:
    from orp_proxy.upstream.mock import main
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from orp_proxy.upstream.mock import main

if __name__ == "__main__":
    main()
