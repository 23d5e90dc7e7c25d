"""The default model in torch: llama.cpp arch "llama" with an MoE FFN (Mixtral semantics), written
to compute what llama.cpp computes for that arch (RMSNorm, RoPE of the NORM kind, GQA attention,
softmax top-k routing with renormalized weights); its GGUF export, its quantization to Q4_K_M by
llama.cpp's own quantizer, and the model back from a GGUF (gguf-py dequantization) or a checkpoint."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...format import byte_vocab
from .corpus import MODEL_NAME


@dataclass
class TinyMoEConfig:
    n_vocab: int
    n_ctx: int = 512
    n_embd: int = 256
    n_layers: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 512            # expert FF width (llama.feed_forward_length)
    n_expert: int = 8
    n_expert_used: int = 2
    rms_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # ggml_rms_norm: x / sqrt(mean(x^2) + eps), then * weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_norm(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp GGML_ROPE_TYPE_NORM: rotate adjacent pairs (x[2i], x[2i+1]).

    x: [B, T, H, D]; pos: [T]. theta_i = pos * base^(-2i/D)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)          # [D/2]
    ang = pos.to(torch.float64)[:, None] * inv[None, :]                     # [T, D/2]
    cos = ang.cos().to(x.dtype)[None, :, None, :]
    sin = ang.sin().to(x.dtype)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: TinyMoEConfig):
        super().__init__()
        c = cfg
        self.cfg = cfg
        hd = c.head_dim
        # nn.Linear weight shape [out, in] == GGUF numpy order (ne1, ne0)
        self.attn_norm = nn.Parameter(torch.ones(c.n_embd))
        self.wq = nn.Linear(c.n_embd, c.n_head * hd, bias=False)
        self.wk = nn.Linear(c.n_embd, c.n_head_kv * hd, bias=False)
        self.wv = nn.Linear(c.n_embd, c.n_head_kv * hd, bias=False)
        self.wo = nn.Linear(c.n_head * hd, c.n_embd, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(c.n_embd))
        self.gate_inp = nn.Linear(c.n_embd, c.n_expert, bias=False)           # [E, n_embd]
        # stacked experts, numpy order of the GGUF tensors
        self.gate_exps = nn.Parameter(torch.empty(c.n_expert, c.n_ff, c.n_embd))
        self.up_exps = nn.Parameter(torch.empty(c.n_expert, c.n_ff, c.n_embd))
        self.down_exps = nn.Parameter(torch.empty(c.n_expert, c.n_embd, c.n_ff))

    def attention(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x.shape
        hd = c.head_dim
        q = self.wq(x).view(B, T, c.n_head, hd)
        k = self.wk(x).view(B, T, c.n_head_kv, hd)
        v = self.wv(x).view(B, T, c.n_head_kv, hd)
        q = rope_norm(q, pos, c.rope_base)
        k = rope_norm(k, pos, c.rope_base)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                   # [B, H, T, D]
        rep = c.n_head // c.n_head_kv
        if rep > 1:  # q head h uses kv head h // rep (ggml broadcast)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        return self.wo(o.transpose(1, 2).reshape(B, T, c.n_head * hd))

    def moe(self, x: torch.Tensor):
        """x: [N, n_embd] -> (out [N, n_embd], probs [N, E], topk ids [N, k])."""
        c = self.cfg
        logits = self.gate_inp(x)                                           # [N, E]
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, c.n_expert_used, dim=-1)                # [N, k]
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)          # Mixtral: norm_w
        # Dispatch: sort the (token, slot) pairs by expert, run each expert on its contiguous
        # group (no padding), scale by the routing weight and scatter-add back in a fixed order.
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=c.n_expert).tolist()
        tok = order // c.n_expert_used
        groups = x.index_select(0, tok).split(counts)
        G, U, Dn = self.gate_exps.unbind(0), self.up_exps.unbind(0), self.down_exps.unbind(0)
        y = torch.cat([(F.silu(h @ G[e].t()) * (h @ U[e].t())) @ Dn[e].t()
                       for e, h in enumerate(groups)])
        y = y * w.reshape(-1)[order][:, None]
        out = x.new_zeros(x.shape).index_add(0, tok, y)
        return out, probs, ids

    def forward(self, x: torch.Tensor, pos: torch.Tensor):
        x = x + self.attention(rms_norm(x, self.attn_norm, self.cfg.rms_eps), pos)
        B, T, C = x.shape
        y, probs, ids = self.moe(rms_norm(x, self.ffn_norm, self.cfg.rms_eps).reshape(B * T, C))
        return x + y.view(B, T, C), probs, ids


class TinyMoE(nn.Module):
    def __init__(self, cfg: TinyMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embd = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_norm = nn.Parameter(torch.ones(cfg.n_embd))
        self.output = nn.Linear(cfg.n_embd, cfg.n_vocab, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        resid = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embd.weight, std=std)
        nn.init.normal_(self.output.weight, std=std)
        for b in self.blocks:
            for lin in (b.wq, b.wk, b.wv):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(b.wo.weight, std=resid)
            nn.init.normal_(b.gate_inp.weight, std=std)
            nn.init.normal_(b.gate_exps, std=std)
            nn.init.normal_(b.up_exps, std=std)
            nn.init.normal_(b.down_exps, std=resid)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0):
        """tokens [B, T] -> logits [B, T, V], router probs per layer [B*T, E], ids per layer."""
        B, T = tokens.shape
        pos = torch.arange(start_pos, start_pos + T)
        x = self.tok_embd(tokens)
        all_probs, all_ids = [], []
        for b in self.blocks:
            x, probs, ids = b(x, pos)
            all_probs.append(probs)
            all_ids.append(ids)
        x = rms_norm(x, self.output_norm, self.cfg.rms_eps)
        return self.output(x), all_probs, all_ids


def load_balance_loss(probs: torch.Tensor, ids: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
    f = torch.bincount(ids.reshape(-1), minlength=n_expert).to(probs.dtype) / ids.numel()
    p = probs.mean(0)
    return n_expert * (f * p).sum()


@torch.no_grad()
def torch_logits(model: TinyMoE, tokens) -> np.ndarray:
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    return model(t)[0][0].numpy()


# --------------------------------------------------------------------------------------------
# GGUF: tensor names, export, loading back (gguf-py dequantization) into the torch model
# --------------------------------------------------------------------------------------------

def gguf_tensors(model: TinyMoE) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 numpy array in GGUF numpy order (reversed ne)."""
    t = {}

    def a(p):
        return p.detach().cpu().float().numpy().copy()
    t["token_embd.weight"] = a(model.tok_embd.weight)                     # ne [n_embd, n_vocab]
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = a(b.attn_norm)
        t[p + "attn_q.weight"] = a(b.wq.weight)                           # ne [n_embd, n_embd]
        t[p + "attn_k.weight"] = a(b.wk.weight)                           # ne [n_embd, n_embd_gqa]
        t[p + "attn_v.weight"] = a(b.wv.weight)
        t[p + "attn_output.weight"] = a(b.wo.weight)
        t[p + "ffn_norm.weight"] = a(b.ffn_norm)
        t[p + "ffn_gate_inp.weight"] = a(b.gate_inp.weight)               # ne [n_embd, n_expert]
        t[p + "ffn_gate_exps.weight"] = a(b.gate_exps)                    # ne [n_embd, n_ff, E]
        t[p + "ffn_up_exps.weight"] = a(b.up_exps)                        # ne [n_embd, n_ff, E]
        t[p + "ffn_down_exps.weight"] = a(b.down_exps)                    # ne [n_ff, n_embd, E]
    t["output_norm.weight"] = a(model.output_norm)
    t["output.weight"] = a(model.output.weight)                           # ne [n_embd, n_vocab]
    return t


def export_gguf(model: TinyMoE, path: Path) -> Path:
    import gguf
    cfg = model.cfg
    bv = byte_vocab
    assert cfg.n_vocab == bv.N_VOCAB, (cfg.n_vocab, bv.N_VOCAB)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..spec import ModelSpec, model_tensors, write_metadata
    spec = ModelSpec(MODEL_NAME, "llama", n_layer=cfg.n_layers, n_embd=cfg.n_embd, n_vocab=cfg.n_vocab,
                     n_ctx=cfg.n_ctx, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim,
                     n_expert=cfg.n_expert, n_used=cfg.n_expert_used, n_ff_exp=cfg.n_ff, n_ff=cfg.n_ff,
                     rms_eps=cfg.rms_eps, rope_base=cfg.rope_base)
    tensors = gguf_tensors(model)
    want = {t.name: t.ne for t in model_tensors(spec)}
    got = {name: tuple(reversed(arr.shape)) for name, arr in tensors.items()}
    assert got == want, f"the trained model's tensors are not the llama layout of testing/spec.py: {got} vs {want}"
    w = gguf.GGUFWriter(str(path), arch="llama")
    write_metadata(w, spec, file_type=gguf.LlamaFileType.ALL_F32)
    w.add_description("Tiny byte-level MoE (Mixtral layout) trained on Python stdlib sources; "
                      "promoe-gguf's embedded default model")
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_q4_k_m(src: Path, dst: Path, nthread: int = 2) -> Path:
    import llama_cpp
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    p.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    return dst


def gguf_field(reader, key):
    f = reader.fields[key]
    if f.types and f.types[0] == __import__("gguf").GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


def model_from_gguf(path: Path) -> TinyMoE:
    """The torch model with weights dequantized by gguf-py from a GGUF (any quant type)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    cfg = TinyMoEConfig(
        n_vocab=int(gguf_field(r, "llama.vocab_size")),
        n_ctx=int(gguf_field(r, "llama.context_length")),
        n_embd=int(gguf_field(r, "llama.embedding_length")),
        n_layers=int(gguf_field(r, "llama.block_count")),
        n_head=int(gguf_field(r, "llama.attention.head_count")),
        n_head_kv=int(gguf_field(r, "llama.attention.head_count_kv")),
        n_ff=int(gguf_field(r, "llama.feed_forward_length")),
        n_expert=int(gguf_field(r, "llama.expert_count")),
        n_expert_used=int(gguf_field(r, "llama.expert_used_count")),
        rms_eps=float(gguf_field(r, "llama.attention.layer_norm_rms_epsilon")),
        rope_base=float(gguf_field(r, "llama.rope.freq_base")),
    )
    arrs = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        arrs[t.name] = np.array(a.reshape(shape), dtype=np.float32, copy=True)
    model = TinyMoE(cfg)
    names = gguf_tensors(model)
    sd = {}
    with torch.no_grad():
        # map back through the same name table
        params = {
            "token_embd.weight": model.tok_embd.weight,
            "output_norm.weight": model.output_norm,
            "output.weight": model.output.weight,
        }
        for i, b in enumerate(model.blocks):
            p = f"blk.{i}."
            params.update({
                p + "attn_norm.weight": b.attn_norm, p + "attn_q.weight": b.wq.weight,
                p + "attn_k.weight": b.wk.weight, p + "attn_v.weight": b.wv.weight,
                p + "attn_output.weight": b.wo.weight, p + "ffn_norm.weight": b.ffn_norm,
                p + "ffn_gate_inp.weight": b.gate_inp.weight,
                p + "ffn_gate_exps.weight": b.gate_exps, p + "ffn_up_exps.weight": b.up_exps,
                p + "ffn_down_exps.weight": b.down_exps,
            })
        assert set(params) == set(names) == set(arrs), set(arrs) ^ set(params)
        for n, prm in params.items():
            prm.copy_(torch.from_numpy(arrs[n]).view(prm.shape))
    del sd
    model.eval()
    return model


def load_ckpt(path: Path) -> tuple[TinyMoE, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = TinyMoE(TinyMoEConfig(**ck["cfg"]))
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck
