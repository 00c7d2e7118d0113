"""Export a run's merged model as a GGUF file for llama.cpp, Ollama and LM Studio
(`plugtune export RUN OUT --gguf TYPE`), with an Ollama Modelfile beside it.

Written with the ``gguf`` package (llama.cpp's own Python library: ``GGUFWriter``, its tensor-name
map and its pure-Python quantizers), following llama.cpp's ``convert_hf_to_gguf.py``: q/k rows
permuted for the llama architecture, 1-D tensors (norms, biases) kept in float32, a tensor whose
rows do not split into quantization blocks written as float16, the tokenizer as tokens, types,
merges and special ids, the chat template as ``tokenizer.chat_template``. Nothing is downloaded
and nothing is compiled: k-quants (Q4_K_M, ...) need llama.cpp's C++ ``llama-quantize``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from plugtune import InputError, PlugtuneError, __version__, atomic_write, hookimpl, sha256

PLUGTUNE_DEFAULT = True  # writes nothing during a run: it only names the format `export` reads

#: ``--gguf TYPE``: what each type stores its 2-D weights as (1-D tensors stay float32).
TYPES = ("f16", "bf16", "q8_0", "q4_0")
#: transformers ``model_type`` -> (llama.cpp architecture, whether q/k rows are permuted).
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
SUPPORTED = "Llama, Mistral, Qwen2 and SmolLM2 (a Llama) causal language models"


@hookimpl
def plugtune_export_formats():
    return {"gguf": write}


def write(option, out, load, name):
    """``plugtune export RUN OUT --gguf TYPE``: ``OUT/model-TYPE.gguf``, ``OUT/Modelfile`` and
    ``OUT/export.json`` (what was written: type, template, tensor types, checksum); ``out`` is
    the directory being written, ``name`` the path it will have."""
    if option not in TYPES:
        given = f"--gguf {option}" if option else "--gguf needs a TYPE"
        raise InputError(f"{given}: not a GGUF type written here; use one of {', '.join(TYPES)} "
                         "(k-quants such as Q4_K_M: run llama.cpp's llama-quantize on the f16 "
                         "file)")
    artifact = load()
    path = Path(out) / f"model-{option}.gguf"
    run = Path(artifact.path).parent
    info = convert(artifact.model, artifact.tokenizer, path, option, title=run.name)
    template = info["chat_template"]
    modelfile, shape = ollama_modelfile(path.name, artifact.tokenizer)
    (Path(out) / "Modelfile").write_text(modelfile)
    manifest = {"format": "gguf", "type": option, "file": path.name, "bytes": path.stat().st_size,
                "sha256": sha256(path), "run": str(run), "architecture": info["architecture"],
                "tensor_types": info["tensor_types"], "tokenizer": info["tokenizer"],
                "chat_template": template, "ollama_template": shape, "plugtune": __version__}
    atomic_write(Path(out) / "export.json", json.dumps(manifest, indent=2) + "\n")
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(info["tensor_types"].items()))
    return [f"wrote {Path(name) / path.name} ({path.stat().st_size / 2**20:.1f} MiB; "
            f"{info['architecture']}; tensors: {kinds}; tokenizer {info['tokenizer']}) and "
            f"{Path(name) / 'Modelfile'}",
            "chat template: " + ("none (the tokenizer has none)" if template is None else
                                 "the tokenizer's, in tokenizer.chat_template; Ollama Modelfile "
                                 f"TEMPLATE: {shape or 'omitted (not a shape it knows)'}"),
            f"run it: llama-cli -m {Path(name) / path.name}   or   cd {name} && ollama create "
            f"NAME -f Modelfile && ollama run NAME"]


def check_model(model):
    """Refuse what has no GGUF form here, in one line: a task head, another architecture."""
    kind = type(model).__name__
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise InputError(f"GGUF export supports {SUPPORTED}; this run's model is "
                         f"{model_type!r} ({kind}): export it with --merge instead")
    if not kind.endswith("ForCausalLM"):
        raise InputError(f"GGUF export writes causal language models; this run's model is a "
                         f"{kind} (a task head, which llama.cpp does not run): export it with "
                         "--merge instead")
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise InputError(f"GGUF export: the model's rope_type {rope['rope_type']!r} is not "
                         "written here; default, linear and llama3 (Llama 3.1+) RoPE are")


def convert(model, tokenizer, path, qtype, title=None):
    """Write ``model`` (a merged transformers causal LM) and ``tokenizer`` to the GGUF file
    ``path`` with 2-D weights as ``qtype`` (one of :data:`TYPES`), named ``title``
    (``general.name``; default the model's folder name). Returns what was written:
    ``architecture``, ``tensor_types`` (count by GGML type), ``tokenizer`` (gpt2 or llama) and
    ``chat_template``."""
    import gguf

    check_model(model)
    c = model.config
    arch_name, permute = ARCHITECTURES[c.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    # tensors spill to a temporary file as they are converted, so the peak is the model plus
    # one tensor's float32 copy, not the model plus the whole file
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    title = title or Path(getattr(c, "_name_or_path", "") or "model").name or "model"
    # transformers' GGUF reader takes a file named exactly "mistral" for an architecture gguf-py
    # has no tensor map for, and cannot read it back
    writer.add_name(f"{title} (plugtune)" if title == "mistral" else title)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    rope = dict(getattr(c, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(name, llama3_rope_factors(c, head_dim))
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0"}[qtype]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind, template = add_tokenizer(writer, tokenizer, c.vocab_size)

    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    counts: dict[str, int] = {"F32": 1} if rope.get("rope_type") == "llama3" else {}
    tied = getattr(c, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd, as transformers ties them on reading back
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise PlugtuneError(f"GGUF export: no GGUF name for the tensor {hf_name} "
                                f"({type(model).__name__})")
        data = tensor.detach().float().cpu().numpy()
        if permute and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            data = permute_rows(data, heads if base.endswith("q_proj") else kv_heads)
        name = f"{name}.{suffix}"
        ggml_type = tensor_type(name, data, qtype)
        counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
        add_tensor(writer, name, data, ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tensor_types": counts,
            "tokenizer": kind, "chat_template": template}


def llama3_rope_factors(config, head_dim):
    """Llama 3.1's RoPE as llama.cpp takes it (``rope_freqs``): by how much each rotary
    frequency is divided, from transformers' own llama3 frequencies against the default ones."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = float(config.rope_parameters["rope_theta"])
    default = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (default / scaled.float()).numpy().astype("float32")


def permute_rows(weights, n_head):
    """llama.cpp's rotary layout for a q or k projection (``convert_hf_to_gguf.py``'s
    ``LlamaModel.permute``): within each head, interleave the two halves of its rows."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tensor_type(name, data, qtype):
    """The GGML type a tensor is stored as: float32 for 1-D tensors (norms, biases); for q4_0
    the embeddings and output layer in q8_0 (as llama-quantize keeps them above 4 bits); float16
    where the rows do not split into the type's blocks (llama.cpp's fallback)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    if data.ndim < 2:
        return T.F32
    chosen = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if chosen == T.Q4_0 and name in ("token_embd.weight", "output.weight"):
        chosen = T.Q8_0
    if data.shape[-1] % GGML_QUANT_SIZES[chosen][0]:
        return T.F16
    return chosen


def add_tensor(writer, name, data, ggml_type):
    import numpy as np
    from gguf import GGMLQuantizationType as T, quants

    if ggml_type == T.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif ggml_type == T.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(data.astype(np.float32), ggml_type),
                          raw_dtype=ggml_type)


# --- the tokenizer ------------------------------------------------------------------------------

def add_tokenizer(writer, tokenizer, vocab_size):
    """Write the tokenizer's vocabulary (padded to the model's ``vocab_size`` with ``[PADn]``
    tokens, as llama.cpp does), token types, merges, special ids, add-BOS/EOS flags and chat
    template; ``gguf.SpecialVocab`` reads merges, ids and template from the saved tokenizer
    files, the flags are what the tokenizer does to a text.
    Returns ``(tokenizer kind, chat template)``: ``gpt2`` for byte-level BPE (SmolLM2, Qwen2,
    Llama 3), ``llama`` for SentencePiece-style BPE with byte fallback (Llama 2, Mistral)."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if not (Path(tmp) / "tokenizer.json").is_file():
            raise InputError(f"GGUF export reads a fast tokenizer's tokenizer.json; the run's "
                             f"{type(tokenizer).__name__} has none")
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise InputError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece "
                             f"style); this one is {model.get('type')!r}")
        kind = "llama" if model.get("byte_fallback") else "gpt2"
        special = SpecialVocab(gguf, tmp, vocab_size)
    # whether BOS/EOS are added is what the tokenizer does, not what its files may say (a
    # reader assumes BOS for a SentencePiece vocabulary that does not say)
    probe = tokenizer("a")["input_ids"]
    for kind_id, at in (("bos", 0), ("eos", -1)):
        token_id = getattr(tokenizer, f"{kind_id}_token_id", None)
        special.add_special_token[kind_id] = token_id is not None and probe[at] == token_id
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise PlugtuneError(f"GGUF export: the tokenizer has {len(vocab)} tokens, more than the "
                            f"model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED if kind == "llama" else T.USER_DEFINED)
        elif i in added:
            tokens.append(token)
            types.append(T.CONTROL if added[i] else T.USER_DEFINED)
        elif kind == "llama" and token.startswith("<0x") and len(token) == 6:
            tokens.append(token)
            types.append(T.BYTE)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    writer.add_tokenizer_model(kind)
    if kind == "llama":
        # SentencePiece merges the pair whose result scores highest: the merge rank does that
        rank = {"".join(m.split(" ") if isinstance(m, str) else m): r
                for r, m in enumerate(model.get("merges", []))}
        writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = T.UNKNOWN
        writer.add_add_space_prefix(True)
    else:
        writer.add_tokenizer_pre(pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return kind, special.chat_template


def SpecialVocab(gguf, directory, vocab_size):
    """``gguf.SpecialVocab`` of a saved tokenizer, quietly (it logs each id it finds)."""
    import logging

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    finally:
        log.setLevel(level)


def pre_tokenizer(spec):
    """llama.cpp's name for how a byte-level BPE splits text before merging
    (``tokenizer.ggml.pre``). llama.cpp names it by hashing a test string's tokens; here it is
    read from the tokenizer's own pre-tokenizer: the split regex transformers' GGUF reader
    knows (Llama 3's, Qwen2's), SmolLM2's single digits, GPT-2's regex, else ``default``."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    regex = next((p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"),
                 None)
    if regex is not None:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_PRE_TOKENIZER_SPLITS,
            )
        except ImportError:  # an older transformers: its names are not needed to write one
            GGUF_PRE_TOKENIZER_SPLITS = {}
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        for preferred in ("llama-bpe", "qwen2"):
            if preferred in names:
                return preferred
        return names[0] if names else "default"
    if "Digits" in types and "ByteLevel" in types:
        return "smollm"
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    return "default"


# --- the Ollama Modelfile -----------------------------------------------------------------------

#: Ollama (Go text/template) forms of the chat shapes it knows, with their stop tokens (a
#: SYSTEM line arrives in ``.Messages`` as the first, system, message).
OLLAMA = {
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
               '{{ end }}<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"]),
    "llama-3": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}'
                '<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
                '<|start_header_id|>assistant<|end_header_id|>\n\n',
                ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}


def render_shape(shape, messages, bos=""):
    """What the chat shape ``shape`` makes of ``messages`` with a generation prompt (the
    reference a tokenizer's own template is compared with)."""
    if shape == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"
    text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                   for m in messages)
    return bos + text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def template_shape(tokenizer):
    """``(shape, default system prompt)`` where the tokenizer's chat template renders a
    conversation exactly as ChatML or Llama 3 do (a template that adds a system turn of its own
    when there is none, as SmolLM2's does, gives that turn's text); ``(None, None)`` else."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    convo = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    bos = tokenizer.bos_token or ""

    def render(messages):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # a template that refuses these roles: not a shape we know
            return None
    for shape in OLLAMA:
        if render(convo) != render_shape(shape, convo, bos):
            continue
        alone = render(convo[1:]) or ""
        if alone == render_shape(shape, convo[1:], bos):
            return shape, None
        head = render_shape(shape, [{"role": "system", "content": "\0"}], bos).split("\0")
        if alone.startswith(head[0]):
            system = alone[len(head[0]):].split(head[1].split("<|im_start|>assistant")[0]
                                                .split("<|start_header_id|>assistant")[0])[0]
            if alone == render_shape(shape, [{"role": "system", "content": system}] + convo[1:],
                                     bos):
                return shape, system
    return None, None


def ollama_modelfile(filename, tokenizer):
    """``(Modelfile text, shape)`` for ``ollama create NAME -f Modelfile``."""
    shape, system = template_shape(tokenizer)
    lines = [f"# Ollama Modelfile written by plugtune {__version__}: "
             "ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{filename}", ""]
    stops = []
    if shape is None:
        lines += ["# TEMPLATE omitted: the chat template is not ChatML or Llama 3 as plugtune can",
                  "# translate it; Ollama then reads tokenizer.chat_template from the GGUF (or",
                  "# write a TEMPLATE by hand: https://github.com/ollama/ollama/blob/main/docs/"
                  "template.md)"]
    else:
        template, stops = OLLAMA[shape]
        lines += [f"# the tokenizer's chat template is {shape}", f'TEMPLATE """{template}"""']
        if system:
            lines += [f'SYSTEM """{system}"""']
    eos = getattr(tokenizer, "eos_token", None)
    for stop in dict.fromkeys(stops + ([eos] if eos else [])):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", shape
