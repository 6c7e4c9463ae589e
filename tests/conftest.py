import sys
from pathlib import Path

# The oracles in tests/published.py are imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
