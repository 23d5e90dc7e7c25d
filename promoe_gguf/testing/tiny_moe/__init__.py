"""The embedded default model (promoe_gguf/data/default-moe-q4_k_m.gguf): a tiny byte-level MoE in
the Mixtral layout (llama.cpp arch "llama"), trained on CPU on the Python standard library's sources.

    corpus.py    the stdlib corpus, its held-out split and token windows; the model's file paths
    model.py     the torch model (what llama.cpp computes for arch "llama"), GGUF export and import,
                 Q4_K_M quantization by llama.cpp, checkpoints loaded back
    evaluate.py  llama.cpp scoring (bits per byte, the F32 GGUF against torch), routing statistics,
                 samples, and the model card (run_eval)
    train.py     the training loop, checkpoints, export of the result, and the whole run (run)

scripts/train_tiny_moe.py and scripts/eval_default_model.py are its command lines."""
from .corpus import (DATA_DIR, DEFAULT_OUT, HELDOUT_MODULUS, MODEL_CARD, MODEL_NAME, SEED,
                     SHIPPED_GGUF, corpus_files, heldout_files, heldout_windows, is_heldout,
                     load_stream, stdlib_dir, train_files)
from .evaluate import (bits_of, llama_bits_per_byte, llama_logits, llama_samples, open_llama,
                       rel_l2, routing_stats, run_eval, torch_bits_per_byte,
                       verify_f32_against_llama_cpp)
from .model import (TinyMoE, TinyMoEConfig, export_gguf, gguf_field, gguf_tensors, load_ckpt,
                    model_from_gguf, quantize_q4_k_m, torch_logits)
# not the function train: `tiny_moe.train` stays the module (train.train is the loop)
from .train import export_all, run, save_ckpt

__all__ = [
    "DATA_DIR", "DEFAULT_OUT", "HELDOUT_MODULUS", "MODEL_CARD", "MODEL_NAME", "SEED", "SHIPPED_GGUF",
    "corpus_files", "heldout_files", "heldout_windows", "is_heldout", "load_stream", "stdlib_dir",
    "train_files",
    "bits_of", "llama_bits_per_byte", "llama_logits", "llama_samples", "open_llama", "rel_l2",
    "routing_stats", "run_eval", "torch_bits_per_byte", "verify_f32_against_llama_cpp",
    "TinyMoE", "TinyMoEConfig", "export_gguf", "gguf_field", "gguf_tensors", "load_ckpt",
    "model_from_gguf", "quantize_q4_k_m", "torch_logits",
    "export_all", "run", "save_ckpt",
]
