import sys
from pathlib import Path

# Test helpers that live beside the integration tests (airflow_services.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
