r"""Activation memory of one training step: the bytes autograd saves for backward, block by block.

The model behind :func:`lora_widgets.memory.fit.estimate_memory`'s forward and backward phases. It follows
Korthikanti et al. 2022 (sec. 4.1): walk a transformer block and count each tensor an operator saves for
its backward once, with the terms adapted to Llama- and GPT-2-style blocks as transformers runs them,
to LoRA (frozen linears save no input), to fp32 logits, and to mixed precision. Every term is explained
on :class:`ActivationModel`; ``docs/memory.md`` compares the totals with measurements.

Notation in the comments: ``T = b*s`` tokens, ``h`` hidden width, ``i`` MLP width, ``p`` bytes per
activation element (compute dtype), ``wb`` bytes per weight element, ``r`` LoRA rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_widgets.memory.arch import ArchInfo, LoRAModule, ParamPlan

__all__ = ["ActivationModel", "BlockBytes"]


@dataclass
class BlockBytes:
    """What one transformer block keeps for backward (bytes), and whether its output requires grad."""

    saved: int
    transient: int  # extra bytes live at the worst moment of this block's backward
    grads: int  # gradient bytes of this block's trainable parameters
    rg_out: bool
    working: int  # bytes live inside the block's forward when nothing is saved (checkpointed forward)
    input_saved: int  # part of ``saved`` that is the block's own input (fp32 RMSNorm input in fp32 runs)
    early_grads: int  # gradient bytes that exist at the transient's moment (the last projection's)
    held: int = (
        0  # inputs an 8-bit base keeps outside autograd's saved tensors (checkpointing keeps them too)
    )


class ActivationModel:
    r"""Bytes autograd saves for backward, per block, following what PyTorch actually keeps.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    arXiv:2205.05198, sec. 4.1) count the activations of a GPT block as :math:`sbh(34 + 5as/h)` bytes in
    16-bit precision: every tensor an operator needs for its backward, with the attention score matrix
    (:math:`5as^2b`) dominating at long sequences. We keep their method (walk the block, count each saved
    input/output once) and adapt the terms to what the code we train runs:

    * Llama-style blocks (RMSNorm, SwiGLU, grouped-query attention, rotary embeddings; transformers'
      implementation): RMSNorm upcasts to fp32 and saves its fp32 input (:math:`4bsh`) and
      :math:`1/\mathrm{rms}` (:math:`4bs`), plus the normalised input (:math:`pbsh`) only when its weight
      trains; SwiGLU saves gate, SiLU(gate) and up (:math:`3pbsi`), and the product (:math:`pbsi`) only if
      ``down_proj`` trains; the fused SDPA kernels (flash / memory-efficient / CPU flash) save
      :math:`q, k, v` (:math:`k, v` at the smaller GQA width), the output and the fp32 log-sum-exp
      (:math:`4b\,n_h s`) and no :math:`s \times s` matrix; eager attention also keeps the fp32 softmax
      (:math:`4b\,n_h s^2`) and its cast.
    * Frozen weights: a frozen ``Linear`` needs no saved input (its input-gradient needs only :math:`W`), so
      with LoRA the inputs of frozen projections are not kept. Each LoRA layer saves the input of
      :math:`A` (shared between LoRA layers that read the same tensor, one copy per layer when dropout is
      on, plus a 1-byte mask) and :math:`A`'s output (:math:`pbsr`) for :math:`B`'s gradient.
      In the first block the input comes from a frozen embedding and requires no grad, so its first norm
      saves nothing.
    * The loss: the log-softmax output over the vocabulary is saved in fp32 (:math:`4bsV`: transformers
      upcasts logits for the loss), which for small models is the largest single activation.
    * An 8-bit base (``quant="8bit"``): bitsandbytes' LLM.int8() matmuls (``MatMul8bitFp`` on a CPU,
      ``MatMul8bitLt`` on a GPU) keep their input ``A`` as an attribute of the autograd context whenever it
      requires grad, frozen weight or not, so every quantized Linear keeps its input (shared between
      layers reading one tensor). Being no saved tensor, it escapes gradient checkpointing: a checkpointed
      block keeps those inputs beside its own input (``BlockBytes.held``). A 4-bit layer keeps only its
      (resident) packed weight.
    * Mixed precision (``wb != p``, ``torch.autocast`` over fp32 weights; Micikevicius et al. 2018, sec. 3):
      the residual stream and norms stay fp32; each matmul saves compute-dtype casts of its operands, so
      every Linear whose input needs a gradient keeps a :math:`p`-byte copy of its weight, and each
      consumer of an fp32 input keeps its own cast of it.
    """

    def __init__(
        self,
        arch: ArchInfo,
        plan: ParamPlan,
        b: int,
        s: int,
        p: int,
        full_head: bool,
        wb: int | None = None,
        quant: str | None = None,
    ) -> None:
        self.arch, self.plan, self.b, self.s, self.p = arch, plan, b, s, p
        # weight bytes; wb != p means mixed precision (torch.autocast): the residual stream and norms stay in
        # the weights' dtype and every matmul casts its operands to the compute dtype
        self.wb = p if wb is None else wb
        self.autocast = self.wb != p
        self.T = b * s
        self.train_leaves = plan.trainable_leaves
        per_layer: dict[str, list[LoRAModule]] = {}
        for m in plan.lora:
            per_layer.setdefault(m.leaf, []).append(m)
        # LoRA modules of one block, by leaf name (every block is adapted alike)
        self.lora = {leaf: mods[0] for leaf, mods in per_layer.items()}
        self.full_head = full_head
        self.keeps_inputs = quant == "8bit"  # LLM.int8() layers keep their input (see the class docstring)

    def _trains(self, leaf: str) -> bool:
        return leaf in self.train_leaves

    def _linear_inputs(
        self, leaves: dict[str, int], width: int, rg_in: bool = True, cast: bool = False
    ) -> tuple[int, bool]:
        """Saved bytes for a group of linears reading one tensor of ``width`` (``leaves``: name -> output
        width), and whether any output needs grad. ``cast``: under autocast the input is in the weights'
        dtype, so each consumer saves its own compute-dtype copy instead of sharing one tensor.
        """
        T, p = self.T, self.p
        saved = 0
        consumers = sum(1 for leaf in leaves if self._trains(leaf))
        rg = False
        held = self.keeps_inputs and rg_in
        for leaf, out in leaves.items():
            mod = self.lora.get(leaf)
            if self.autocast and (rg_in or self._trains(leaf)):
                saved += width * out * p  # the weight's compute-dtype copy, needed for the input gradient
            if held and (mod is None or mod.dropout):
                consumers += 1  # the 8-bit base layer keeps its input (with LoRA and no dropout: shared)
            if mod is None:
                rg = rg or self._trains(leaf)
                continue
            rg = True
            saved += T * mod.r * p  # A's output, saved by B
            if self.autocast:
                saved += mod.r * (width + out) * p  # compute-dtype copies of A and B
            if mod.dropout:
                saved += T * width * (p + 1)  # dropout output (saved by A, or its cast) + 1-byte mask
            elif self.autocast and not cast:
                # the layer casts a compute-dtype input to A's fp32 dtype, and autocast casts it back for
                # A's matmul: A saves a fresh copy rather than sharing the input
                saved += T * width * p
            else:
                consumers += 1
        if consumers:
            saved += T * width * p * (consumers if cast else 1)
        return saved, rg

    def _rmsnorm(self, rg_in: bool, leaf: str) -> int:
        T, h = self.T, self.arch.hidden
        saved = 0
        if rg_in:
            saved += T * h * 4 + T * 4  # fp32 input + 1/rms
        if self._trains(leaf):
            saved += T * h * self.wb  # normalised input, for the weight's gradient
        return saved

    def _grads_of_block(self) -> int:
        """Gradient bytes of one block's trainable parameters (LoRA factors or all weights)."""
        a = self.arch
        return int(self.plan.trainable - self._head_and_embed_trainable()) // a.layers * self.wb

    def _head_and_embed_trainable(self) -> int:
        a = self.arch
        n = 0
        if self.full_head:
            n += a.vocab * a.hidden * (1 if a.tied else 2) + a.hidden  # embeddings, head, final norm
            if a.family == "gpt2":
                n += a.hidden + a.positions * a.hidden  # final LayerNorm bias, position embeddings
        return n

    def llama_block(self, rg_in: bool) -> BlockBytes:
        a, T, p = self.arch, self.T, self.p
        b, s = self.b, self.s
        h, i = a.hidden, a.intermediate
        q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
        saved = self._rmsnorm(rg_in, "input_layernorm")
        norm_rg = rg_in or self._trains("input_layernorm")
        cast = self.autocast  # under autocast the norm output is in the weights' dtype: each matmul casts it
        lin, proj_rg = self._linear_inputs(
            {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim}, h, rg_in or norm_rg, cast
        )
        saved += lin
        attn_rg = norm_rg or proj_rg
        if attn_rg:
            saved += T * (2 * q_dim + 2 * kv_dim) * p  # q, k, v (after RoPE) and the output
            if a.attn_impl == "eager":
                # repeat_kv copies k and v to the full head count; softmax saved in fp32 plus its cast
                saved += 2 * T * (q_dim - kv_dim) * p + b * a.heads * s * s * (4 + (p if p != 4 else 0))
            else:
                saved += b * a.heads * s * 4  # log-sum-exp (fp32)
        o_saved, o_rg = self._linear_inputs({"o_proj": h}, q_dim, attn_rg)
        o_lora = self.lora.get("o_proj")
        shares_output = o_lora is not None and not o_lora.dropout and not self.autocast
        if attn_rg and (self._trains("o_proj") or shares_output or self.keeps_inputs):
            o_saved -= T * q_dim * p  # o_proj's input is the attention output, already counted
        saved += o_saved
        rg_mid = rg_in or attn_rg or o_rg
        saved += self._rmsnorm(rg_mid, "post_attention_layernorm")
        mlp_in_rg = rg_mid or self._trains("post_attention_layernorm")
        lin, gu_rg = self._linear_inputs({"gate_proj": i, "up_proj": i}, h, mlp_in_rg, cast)
        saved += lin
        gate_rg = mlp_in_rg or self._trains("gate_proj") or "gate_proj" in self.lora
        up_rg = mlp_in_rg or self._trains("up_proj") or "up_proj" in self.lora
        if gate_rg:
            saved += 2 * T * i * p  # SiLU's input (gate), and up (the product's gradient w.r.t. SiLU(gate))
        if up_rg:
            saved += T * i * p  # SiLU(gate), for the gradient w.r.t. up
        lin, down_rg = self._linear_inputs({"down_proj": h}, i, gate_rg or up_rg)
        saved += lin
        rg_out = rg_mid or gate_rg or up_rg or down_rg or gu_rg
        # Backward of the MLP: once down_proj's backward is done (its saved input released), the product's
        # gradient and the gradients w.r.t. SiLU(gate) and up are live at once, plus the residual gradients.
        wb = self.wb
        transient = 3 * T * i * p + 2 * T * h * wb - lin
        if self.autocast and "down_proj" in self.lora:
            transient += T * i * wb  # the gradient of LoRA's fp32 view of the product, before its cast back
        # Checkpointed forward: residual + normalised input, and in the MLP SiLU(gate), up, the product (or,
        # inside a LoRA layer, its base output, update, scaled update and sum)
        mlp_lora = any(leaf in self.lora for leaf in ("gate_proj", "up_proj", "down_proj"))
        working = 2 * T * h * wb + (4 if mlp_lora else 3) * T * i * p
        input_saved = T * h * 4 if (rg_in and wb == 4) else 0  # RMSNorm saves an fp32 input as it is
        held = 0
        if self.keeps_inputs:  # 8-bit base: q/k/v, o, gate/up and down inputs, kept by the layers themselves
            held = T * p * (h * norm_rg + q_dim * attn_rg + h * mlp_in_rg + i * (gate_rg or up_rg))
        # down_proj's weight gradient (under autocast computed in the compute dtype, then cast)
        early = h * i * (wb + (p if self.autocast else 0)) if self._trains("down_proj") else 0
        return BlockBytes(saved, transient, self._grads_of_block(), rg_out, working, input_saved, early, held)

    def gpt2_block(self, rg_in: bool) -> BlockBytes:
        """GPT-2 block (LayerNorm, fused qkv ``c_attn``, GELU-tanh MLP; transformers' ``Conv1D`` layers)."""
        a, T, p, wb = self.arch, self.T, self.p, self.wb
        h, i = a.hidden, a.intermediate
        saved = 0
        ln1_rg = rg_in or self._trains("ln_1")
        if ln1_rg:
            saved += T * h * wb + 2 * T * 4  # LayerNorm: input, mean and rstd (fp32)
        lin, qkv_rg = self._linear_inputs({"c_attn": 3 * h}, h, ln1_rg, self.autocast)
        saved += lin
        attn_rg = ln1_rg or qkv_rg
        if attn_rg:
            # the fused qkv output (k is a view of it), contiguous copies of q and v, the output, log-sum-exp
            saved += 6 * T * h * p + self.b * a.heads * self.s * 4
            if a.attn_impl == "eager":
                saved += self.b * a.heads * self.s * self.s * 2 * p
        c_proj = self.lora.get("c_proj")
        if c_proj is not None:  # LoRA on both c_proj layers (attention: input is the attention output)
            saved += 2 * T * c_proj.r * p + T * i * p
            if c_proj.dropout:
                saved += T * (h + i) * (p + 1)
        if self.autocast:  # compute-dtype copies of both c_proj weights (attention h x h, MLP i x h)
            saved += (h * h + i * h) * p
        if a.dropout > 0:
            saved += 2 * T * h  # residual dropout masks (1 byte each, fused CUDA kernel)
        rg_mid = rg_in or attn_rg or c_proj is not None or self._trains("c_proj")
        ln2_rg = rg_mid or self._trains("ln_2")
        if ln2_rg:
            saved += T * h * wb + 2 * T * 4
        lin, fc_rg = self._linear_inputs({"c_fc": i}, h, ln2_rg, self.autocast)
        saved += lin
        if ln2_rg or fc_rg:
            saved += 4 * T * i * p  # gelu_new, a Python tanh formula: x, tanh(..), 0.5 x, 1 + tanh(..)
            if self._trains("c_proj") and c_proj is None:
                saved += T * i * p  # the MLP's c_proj input
        transient = 3 * T * i * p + 2 * T * h * wb
        working = 2 * T * h * wb + 4 * T * i * p
        input_saved = T * h * wb if ln1_rg else 0
        early = h * i * (wb + (p if self.autocast else 0)) if self._trains("c_proj") else 0
        return BlockBytes(saved, transient, self._grads_of_block(), True, working, input_saved, early)

    def block(self, rg_in: bool) -> BlockBytes:
        return self.gpt2_block(rg_in) if self.arch.family == "gpt2" else self.llama_block(rg_in)

    def final(self, rg: bool) -> int:
        """Saved by the final norm, the head and the loss (the fp32 log-softmax)."""
        a, T, p, wb = self.arch, self.T, self.p, self.wb
        saved = 0
        if rg:  # final RMSNorm (fp32 input, 1/rms) or LayerNorm (input, mean, rstd)
            saved += T * a.hidden * 4 + T * 4 if a.family == "llama" else T * a.hidden * wb + 2 * T * 4
        if self.full_head:
            # RMSNorm's normalised input (for its weight) and the head's input (its compute-dtype copy)
            saved += T * a.hidden * (wb + p) if a.family == "llama" else T * a.hidden * p
        if self.autocast and rg:
            saved += a.vocab * a.hidden * p  # the head weight's compute-dtype copy
        saved += T * a.vocab * 4 + T * 8  # log-softmax output (fp32) and the shifted labels
        return saved
