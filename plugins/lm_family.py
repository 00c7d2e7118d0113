"""What causal-language-model objectives share (public, plugin API 1.3): the roles and checks
of a conversation, its rendering with the chat template and which of its tokens are learnt
(:func:`encode_messages`), the tokens a tokenizer puts before text (:func:`special_prefix`),
and the output layer and its chunked loss (:func:`final_hidden_states`, :func:`chunk_tokens`,
:func:`logit_transform`). The ``causal_lm`` plugin and the preference objectives
(``preference_family``) are built on it; so can a stranger's task."""

import contextlib
import json
import math
import weakref

import torch
from accelerate.utils import extract_model_from_parallel

from plugtune import chat
from plugtune.data import span_lengths
from plugtune.errors import DataError
from plugtune.loss import IGNORE


#: The roles chat templates render (Llama 3, Qwen 2.5, Mistral, SmolLM2, ChatML).
ROLES = ("system", "user", "assistant", "tool")


#: ``loss_chunk_tokens: auto`` chunks the loss of vocabularies at least this large, in chunks of
#: at most CHUNK_BYTES of float32 logits.
CHUNK_VOCAB, CHUNK_BYTES = 32_000, 128 * 2 ** 20


@contextlib.contextmanager
def rendering(where):
    import jinja2

    try:
        yield
    except (jinja2.TemplateError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise DataError(f"{where}: the chat template cannot render this conversation "
                        f"({' '.join(str(exc).split())[:160]}); fix the record or choose "
                        "another data.chat_template") from exc


def token_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages, generation_prompt=False, where="a record"):
    if not messages:
        return ""
    with rendering(where):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)


def check_messages(messages, where, roles=ROLES, train=("assistant",)):
    """A DataError unless ``messages`` is a conversation to learn from: role/content objects,
    string contents, known roles, at least one turn of a role in ``train``."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise DataError(f"{where}: messages must be a list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}] content must be a string, got "
                            f"{json_kind(m['content'])}")
        if m["role"] not in roles:
            raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r}; roles are "
                            f"{', '.join(roles)} (map the data's tags to them with data.roles, "
                            f"e.g. {{assistant: {m['role']}}}, or set causal_lm.roles for a "
                            "template with others)")
    if not any(is_learnt(m, train, where, i) for i, m in enumerate(messages)):
        if tuple(train) == ("assistant",):
            raise DataError(f"{where}: this conversation has no assistant turn, so there is "
                            "nothing to learn; add the assistant's answer (role \"assistant\")")
        raise DataError(f"{where}: this conversation has no turn of {', '.join(train)} "
                        "(data.roles_to_train), so there is nothing to learn")


def is_learnt(message, train, where="a record", i=0):
    """Whether a turn is learnt: its own ``train`` (true/false) or ``weight`` (1/0) field, as
    axolotl reads them, where it has one (not null); else whether its role is in ``train``
    (``data.roles_to_train``)."""
    flag = message.get("train", message.get("weight"))
    if flag is None:
        return message["role"] in train
    if flag not in (0, 1):  # True and False are 1 and 0
        raise DataError(f"{where}: messages[{i}] train/weight must be true/false or 1/0, got "
                        f"{json_kind(flag)}")
    return bool(flag)


def json_kind(value):
    """A value as JSON names it: null, true, a number 3, a list [...], an object {...}."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    kind = {int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
    return f"{kind} {json.dumps(value, ensure_ascii=False, default=str)[:40]}"


def encode_messages(tokenizer, messages, where, roles=ROLES, train=("assistant",),
                    eos="turn", ends=None):
    """Token ids and labels of a conversation: the turns of the roles in ``train`` are learnt
    (``data.roles_to_train``), with or without their end (``eos``, ``data.train_on_eos``).

    Each turn is located by rendering the conversation up to it: it ends where "up to and
    including the turn" ends, and its content starts where that parts from "up to the turn,
    with the generation prompt" (an assistant turn) or "... with the turn left empty". Its end
    is the end-of-turn token after the content (``ends``: :func:`end_tokens`) and what the
    template puts after it in the turn (a newline)."""
    check_messages(messages, where, roles, train)
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: messages need a tokenizer with a chat template; this one has "
                        "none (set data.chat_template, e.g. chatml, or alpaca for a base model)")
    ends = end_tokens(tokenizer) if ends is None else ends
    ids = token_ids(tokenizer, render(tokenizer, messages, where=where))
    labels = [IGNORE] * len(ids)
    learnt = [i for i, m in enumerate(messages) if is_learnt(m, train, where, i)]
    for i, m in enumerate(messages):
        if i not in learnt and eos != "all":
            continue
        upto = token_ids(tokenizer, render(tokenizer, messages[:i + 1], where=where))
        if ids[:len(upto)] != upto:
            raise DataError(f"{where}: the chat template does not render this conversation "
                            "turn by turn, so its turns cannot be located")
        start = turn_start(tokenizer, messages, i, upto, where)
        stop = next((p for p in range(start, len(upto)) if upto[p] in ends), len(upto))
        if i in learnt:
            labels[start:stop] = upto[start:stop]
        if eos == "all" or i in learnt and (eos == "turn" or eos == "last" and i == learnt[-1]):
            labels[stop:len(upto)] = upto[stop:]
    return ids, labels


def turn_start(tokenizer, messages, i, upto, where):
    """Where the content of turn ``i`` starts in ``upto`` (the ids of ``messages[:i + 1]``)."""
    m = messages[i]
    if m["role"] == "assistant":
        probe = render(tokenizer, messages[:i], True, where)
    else:
        probe = render(tokenizer, messages[:i] + [{**m, "content": ""}], where=where)
    probe = token_ids(tokenizer, probe)
    n = 0
    while n < min(len(probe), len(upto)) and probe[n] == upto[n]:
        n += 1
    return n


def end_tokens(tokenizer):
    """The ids that end a turn: the eos token's, and those of the end-of-turn tokens chat
    templates use (``plugtune.chat.END_OF_TURN``) that the tokenizer has as one token."""
    ids = {tokenizer.eos_token_id}
    for text in chat.END_OF_TURN:
        found = token_ids(tokenizer, text)
        if len(found) == 1:
            ids.add(found[0])
    return ids


def special_prefix(tokenizer):
    """The tokens a tokenizer puts before any text of its own accord (the BOS token of Llama
    and Mistral tokenizers; nothing for GPT-2 style ones), found by tokenizing a probe with and
    without special tokens, so ``text`` and ``prompt``/``completion`` records start as the
    model saw text in pre-training, and as ``plugtune generate`` feeds a prompt."""
    plain, full = token_ids(tokenizer, "a"), tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def output_layer(model):
    model = extract_model_from_parallel(model)
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


#: config keys of architectures that change their logits after the output layer (Cohere's
#: logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, Gemma 2's
#: final_logit_softcapping): what the planner, on a model without weights, goes by. A model
#: with weights is asked instead (:func:`logit_transform`).
CHANGES_LOGITS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def chunk_tokens(setting, model):
    """Labelled tokens per loss chunk for ``model``, or None for the plain loss, from a
    ``loss_chunk_tokens``-style ``setting`` (a number, ``"auto"``: chunks of at most
    CHUNK_BYTES of float32 logits for vocabularies of CHUNK_VOCAB tokens or more, or None: off);
    None also where the model changes its output layer's result in a way the chunked loss does
    not repeat."""
    config = getattr(extract_model_from_parallel(model), "config", None)
    head = output_layer(model)
    if setting is None or head is None or config is None:
        return None
    if setting == "auto":
        vocab = getattr(head, "out_features", None) or getattr(config, "vocab_size", 0)
        if vocab < CHUNK_VOCAB:
            return None
        setting = max(64, 2 ** int(math.log2(CHUNK_BYTES / (4 * vocab))))
    return None if logit_transform(model) == "other" else setting


def logit_transform(model):
    """What ``model`` does to its output layer's result to make its logits: ``"none"``,
    ``"softcap"`` (Gemma 2's ``tanh(x / c) * c``, which the chunked loss repeats) or
    ``"other"`` (a rescaling, or anything else: the loss is then not chunked). Found once per
    model by a two-token forward pass in eval mode (no dropout, so no random number is drawn)
    that compares the two, so an architecture nobody listed is caught too; a model without
    weights (the planner's) is judged by its config."""
    base = extract_model_from_parallel(model)
    known = getattr(base, "_plugtune_logit_transform", None)
    if known is not None:
        return known
    config, head = base.config, output_layer(model)
    weight = next(head.parameters(), None)
    if weight is None or weight.device.type == "meta":
        if any(getattr(config, k, None) not in (None, 1, 1.0) for k in CHANGES_LOGITS):
            return "other"
        return "softcap" if getattr(config, "final_logit_softcapping", None) else "none"
    made = []
    handle = head.register_forward_hook(lambda module, args, out: made.append(out))
    training = base.training
    base.eval()
    try:
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([[0, 1]], device=weight.device),
                          use_cache=False).logits.float()
        known = compare_logits(made[-1].float(), logits,
                         getattr(config, "final_logit_softcapping", None),
                         torch.finfo(made[-1].dtype).eps)
    except Exception:  # noqa: BLE001 - a model that cannot be probed alone: the plain loss
        known = "other"
    finally:
        handle.remove()
        base.train(training)
    base._plugtune_logit_transform = known
    return known


def compare_logits(out, logits, softcap, eps):
    """``"none"``, ``"softcap"`` or ``"other"``: how ``logits`` follow from the output layer's
    ``out`` (to the rounding of the layer's dtype, ``eps``)."""
    def close(a, b):
        return a.shape == b.shape and torch.allclose(a, b, rtol=4 * eps, atol=4 * eps)

    if close(out, logits):
        return "none"
    if softcap and close(torch.tanh(out / softcap) * softcap, logits):
        return "softcap"
    return "other"


@contextlib.contextmanager
def final_hidden_states(model):
    """Within the block, a forward pass of ``model`` (whatever wraps it: peft, DDP) leaves the
    output layer's input in the yielded list and gives the output layer nothing to compute
    (a zero-length slice), so the full logits are never made."""
    captured, head = [], output_layer(model)

    def capture(module, args, kwargs):
        if args:
            captured.append(args[0])
            return (args[0][..., :0, :],) + tuple(args[1:]), kwargs
        key = next(iter(kwargs))
        captured.append(kwargs[key])
        return args, {**kwargs, key: kwargs[key][..., :0, :]}

    handle = head.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


# ---------------------------------------------------------------- packed attention on SDPA

#: The attention implementation a packed SDPA model runs (registered with transformers'
#: ``AttentionInterface`` as this module loads): SDPA one packed example at a time.
PACKED_SDPA = "sdpa_packed"


def segment_lengths(position_ids):
    """The lengths of the examples laid end to end in a one-row ``position_ids``
    (:func:`plugtune.data.span_lengths`), as a list. Remembered for the tensor last asked
    about: every layer of a forward pass (and its recomputation) asks with the same one, and
    reading the lengths waits for the device once."""
    cached = _segments.get("ids")
    if cached is not None and cached() is position_ids:
        return _segments["lengths"]
    lengths = span_lengths(position_ids[:1]).tolist()
    _segments.update(ids=weakref.ref(position_ids), lengths=lengths)
    return lengths


_segments: dict = {}


def packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, run one packed example at a time where a row holds several
    (a one-row ``position_ids`` restarting per example, no key/value cache): each example
    attends causally to itself alone at the cost of its own length squared, instead of the
    row's width squared under a block-diagonal mask (what SDPA gets from transformers for
    packed rows, and what CPUs and GPUs without flash attention would compute in full). Any
    other call (padded or unpacked batches, generation, sliding-window layers) is plain SDPA
    with the mask transformers built. Hand-written because torch has no variable-length SDPA
    on CPU (``torch.nn.attention.varlen`` is CUDA flash attention only) and flex attention has
    no CPU backward in torch 2.13."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    width = query.shape[2]
    if (pos is None or query.shape[0] != 1 or pos.shape[-1] != width or key.shape[2] != width
            or getattr(module, "sliding_window", None) or query.is_meta):  # meta: the planner
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = segment_lengths(pos)
    if len(lengths) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2),
                               value.split(lengths, 2))]
    return torch.cat(outs, dim=1), None


def _register_packed_sdpa():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    # the same mask as SDPA's (padded batches, generation, sliding windows need it; a packed
    # row's block-diagonal mask is built and left unused: booleans, rows x width^2)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


_register_packed_sdpa()


def packed_attention(model):
    """The attention implementation packed rows should run on ``model``: :data:`PACKED_SDPA`
    where it runs SDPA, else None (eager keeps its rows; flash attention reads packed rows as
    variable-length sequences itself; flex attention builds a sparse block mask)."""
    config = getattr(extract_model_from_parallel(model), "config", None)
    kind = getattr(config, "_attn_implementation", None)
    return PACKED_SDPA if kind in ("sdpa", PACKED_SDPA) else None
