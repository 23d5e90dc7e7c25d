"""Files the package ships (a leaf module: anything may import it)."""
import os

DATA = os.path.join(os.path.dirname(__file__), "data")
DEFAULT_MODEL = os.path.join(DATA, "default-moe-q4_k_m.gguf")
