import os
from pathlib import Path

# Set before anything imports triton or mvmae_fast: Triton reads TRITON_INTERPRET when a kernel is
# decorated, and mvmae_fast reads MVMAE_FAST_POISON at import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MVMAE_FAST_POISON", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".inductor_cache"))
