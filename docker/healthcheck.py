"""Container health check: exit 0 when the service's ``/readyz`` answers 200, else 1.

Standard library only (the slim images have no curl). The port is the service's own
``OODSERVE_PORT`` (8000 in the image).
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('OODSERVE_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # 503 while warming up, or no answer
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
