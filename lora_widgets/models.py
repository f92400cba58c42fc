"""The shipped tiny base model, the built-in corpora, and a sampling helper for before/after comparisons.

Everything here works offline: the base model lives in the package (``BASE_MODEL_PATH``) and the corpora
are read from the Python installation (:mod:`lora_widgets.data.corpora`). A hub id such as
``"HuggingFaceTB/SmolLM2-135M"`` goes through exactly the same loading code as the shipped model
(``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``), so a Colab user with a GPU
swaps one string.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lora_widgets.devices import select_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BASE_MODEL_PATH",
    "check_vocab",
    "generate",
    "load_base_model",
    "load_model",
    "stop_token_ids",
]

#: Directory of the shipped pretrained base model (``save_pretrained`` output plus its model card).
BASE_MODEL_PATH: Path = Path(__file__).resolve().parent / "assets" / "base_model"


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` (the checkpoint's own dtype) or the one table of dtype names (``memory_arch.parse_dtype``)."""
    from lora_widgets.memory.arch import parse_dtype  # memory_arch imports lora; keep demo's import light

    return None if dtype is None else parse_dtype(dtype)


def _looks_like_local_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else with a path shape is meant to be local."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(("/", ".json", ".safetensors"))
    )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    base: Any = "16-bit",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the shipped model, a local directory or a hub id.

    All three go through ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    The tokenizer gets a padding token (its EOS token) if it has none, since batching needs one.

    Args:
        name_or_path: ``None`` for the shipped base model; a local directory written by ``save_pretrained``;
            or a Hugging Face hub id (downloaded unless ``HF_HUB_OFFLINE=1``).
        device: where to put the model (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a
            ``torch.device``; :func:`lora_widgets.devices.select_device`); ``None`` keeps it on the CPU.
        dtype: parameter dtype (``torch.float32``, ``"bf16"``, ...); ``None`` keeps the checkpoint's default.
            With a quantized base it is the dtype of the layers left unquantized (embeddings, norms, head).
        base: the frozen base's storage (:data:`lora_widgets.quantization.BASE_PRECISIONS`): ``"16-bit"``
            (not quantized), ``"8-bit"`` (LLM.int8()), ``"4-bit"`` (NF4, double quantization, compute dtype
            bf16 / fp16 on a T4 / fp32 on the CPU: QLoRA's recipe), or your own ``BitsAndBytesConfig``.
            A quantized base needs bitsandbytes and is placed on ``device`` (default the CPU) as it loads.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        RuntimeError: ``device`` is not available here (the message lists what was found).
        ValueError: an unknown dtype, base or device name (``"tpu"``); a local path that does not exist; a name
            that is neither a local directory nor loadable from the hub (the message says what was tried and why
            it failed); a device bitsandbytes cannot use.
        ImportError: a quantized base without bitsandbytes (the message gives the install command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_widgets.quantization import keep_cpu_layout, quantization_config

    torch_dtype = _resolve_dtype(dtype)
    target = torch.device("cpu") if device is None else select_device(device)  # "tpu" named before loading
    quantization = quantization_config(base, target)  # checked before anything is read
    source: str | Path = BASE_MODEL_PATH if name_or_path is None else name_or_path  # type: ignore[assignment]
    if isinstance(source, os.PathLike):
        source = Path(source).expanduser()
        if not source.is_dir():
            raise ValueError(
                f"model directory {str(source)!r} does not exist; pass a directory written by "
                "save_pretrained, a hub id such as 'HuggingFaceTB/SmolLM2-135M', or None for the shipped model"
            )
    elif not isinstance(source, str):
        raise TypeError(f"name_or_path must be a str, a path or None, got {type(source).__name__}")
    elif not Path(source).expanduser().is_dir() and _looks_like_local_path(source):
        raise ValueError(
            f"model directory {source!r} does not exist (resolved to {Path(source).expanduser().resolve()}); "
            "pass an existing directory written by save_pretrained, or a hub id such as "
            "'HuggingFaceTB/SmolLM2-135M'"
        )
    elif Path(source).expanduser().is_dir():
        source = Path(source).expanduser()

    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        # transformers >= 4.56 calls it `dtype`; older releases only know `torch_dtype`.
        import transformers

        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        kwargs["dtype" if major_minor >= (4, 56) else "torch_dtype"] = torch_dtype
    if quantization is not None:  # quantized as the weights load, straight onto the device
        kwargs.update(quantization_config=quantization, device_map={"": target})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(source, Path):
            raise ValueError(
                f"could not load a model from the local directory {str(source)!r}: {exc}. It must hold what "
                "save_pretrained writes (config.json, the weights and the tokenizer files)"
            ) from exc
        if not isinstance(exc, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ValueError(
            f"could not load a model from {str(source)!r}: tried it as a local directory (not found) and as a "
            f"Hugging Face hub id ({'the hub is switched off by HF_HUB_OFFLINE=1' if offline else 'download failed'}"
            f": {exc}). Check the spelling, download it once while online, or pass a local directory"
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None:
        keep_cpu_layout(model)
    elif device is not None:
        cast(torch.nn.Module, model).to(target)
    model.eval()
    return model, tokenizer


def load_base_model(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, base: Any = "16-bit"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the shipped pretrained tiny Llama (about 1.9 M parameters) and its tokenizer, offline.

    ``base="4-bit"`` loads it quantized, as :func:`load_model` does. See ``BASE_MODEL_PATH / "README.md"``
    (the model card) for its corpus, size and losses.
    """
    return load_model(None, device=device, dtype=dtype, base=base)


def _check_generate_args(
    prompt: Any, max_new_tokens: Any, temperature: Any, top_k: Any, seed: Any, include_prompt: Any
) -> None:
    if not isinstance(prompt, (str, list)):
        raise TypeError(
            f"prompt must be a str or a list of {{'role', 'content'}} messages, got {type(prompt).__name__} "
            f"({prompt!r:.60}); pass '' to start from nothing"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(
            f"temperature must be a number >= 0 (0 = greedy, 0.7 a common choice), got {temperature!r}"
        )
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filtering), got {top_k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(include_prompt, bool):
        raise ValueError(f"include_prompt must be True or False, got {include_prompt!r}")


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a generation: the tokenizer's EOS and every EOS id in the model's generation config.

    An instruct model's end-of-turn token (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) is listed in its
    ``generation_config.eos_token_id``; the shipped model's end-of-turn token is its EOS.
    """
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    for token_id in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> list[int]:
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "prompt is a list of messages but the tokenizer has no chat template; set "
                "tokenizer.chat_template, or pass the prompt as a str"
            )
        from lora_widgets.data.rows import check_messages  # data's package imports models (sft_eval)

        messages = check_messages(prompt, "prompt")
        encoded: Any = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
    ids: list[int] = tokenizer(prompt)["input_ids"] if prompt else []
    if not ids:  # start a fresh document
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the prompt is empty and the tokenizer has no BOS/EOS token to start from")
        ids = [int(start)]
    return ids


def check_vocab(model: torch.nn.Module, prompts: list[list[int]]) -> None:
    """Refuse token ids the model's embedding has no row for (a tokenizer of another model): the embedding
    lookup would raise a bare ``IndexError``."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if not isinstance(rows, int):
        return
    for i, ids in enumerate(prompts):
        top = max(ids, default=0)
        if top >= rows:
            raise ValueError(
                f"prompt {i} has token id {top}, but the model's vocabulary has {rows} tokens: the tokenizer "
                "belongs to another model; pass the tokenizer that came with the model (load_model returns both)"
            )


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, str]],
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    include_prompt: bool = True,
) -> str:
    """Sample a continuation of ``prompt`` (text or a chat); the same seed gives the same text.

    A str prompt is continued as text. A list of ``{"role", "content"}`` messages is rendered by the tokenizer's
    chat template with the generation prompt (``apply_chat_template(..., add_generation_prompt=True)``), and the
    assistant's reply is returned. Generation stops at the end-of-turn / EOS token (:func:`stop_token_ids`).

    ``temperature == 0`` decodes greedily; otherwise tokens are sampled from the softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens (``top_k=0``: no restriction).
    The global RNG state is saved and restored, so sampling does not disturb a training run's seed; the
    model's train/eval mode is restored too.

    Returns:
        For a str prompt: ``prompt`` followed by the generated text (only the generated text if
        ``include_prompt=False``). For messages: only the reply, special tokens left out.

    Raises:
        TypeError: ``prompt`` is neither a str nor a list (``None`` included).
        ValueError: ``max_new_tokens < 1``, a ``temperature`` that is not a number >= 0, ``top_k < 0``, a
            non-int ``seed``, a bad message list, or messages with a tokenizer that has no chat template.
    """
    _check_generate_args(prompt, max_new_tokens, temperature, top_k, seed, include_prompt)
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompt)
    check_vocab(model, [ids])
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=float(temperature), top_k=top_k, top_p=1.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(seed)
            output = model.generate(  # type: ignore[operator]
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=pad_id,
                eos_token_id=stop_token_ids(model, tokenizer),
                **options,
            )  # [1, T + new]
    finally:
        model.train(was_training)
    new_text = str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    if isinstance(prompt, list):
        return new_text
    return prompt + new_text if include_prompt else new_text
