"""Record formats: the shapes the community shares chat and instruction data in, turned into the
fields the ``causal_lm`` task reads (``messages`` of role/content turns, ``prompt`` and
``completion``, or ``text``), as ``data.format`` says (after ``data.columns`` renames fields):

- ``openai``: ``{"messages": [{"role", "content"}, ...]}`` (torchtune's ``openai`` style);
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...], "system"?}`` with the tags
  ``human``, ``gpt``, ``system``, ``tool``/``observation`` (LLaMA-Factory's and torchtune's);
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``, as messages: a
  user turn (the instruction, then a blank line and the input where there is one) and an
  assistant turn, after the ``history`` pairs;
  rendered with the chat template (``data.chat_template: alpaca`` is Stanford Alpaca's prompt);
- ``prompt_completion``: ``{"prompt", "completion"}``; ``text`` (axolotl: ``completion``):
  ``{"text"}``, learnt whole;
- ``auto``: each record by its fields: ``messages``, ``prompt``/``completion`` and ``text`` as
  they are, ``conversations`` as sharegpt, ``instruction`` with ``output`` as alpaca.

``data.roles`` maps a role to the tag(s) the data uses for it, ``data.message_fields`` a
message's role/content fields to the keys they are read from. A bad record is a
:class:`~plugtune.errors.DataError` naming its file and line."""
import json

from plugtune.errors import DataError

#: ShareGPT's role tags (LLaMA-Factory's defaults) and the OpenAI roles, as the roles they are.
SHAREGPT_TAGS = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                 "observation": "tool", "user": "user", "assistant": "assistant"}
#: The field each format's conversation is read from, and its messages' default fields.
CONVERSATION = {"openai": ("messages", "role", "content"),
                "sharegpt": ("conversations", "from", "value")}
#: The fields a record of each format must have.
REQUIRED = {"openai": ("messages",), "sharegpt": ("conversations",),
            "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "text": ("text",), "completion": ("text",)}


def detect(data):
    """The format of one record under ``data.format: auto``."""
    if "messages" in data:
        return "openai"
    if "text" in data or {"prompt", "completion"} <= set(data):
        return "as-is"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    return "as-is"  # the task says what it misses


def tags(fmt, roles):
    """``{tag: role}`` of a conversation format with ``data.roles`` (``{role: tag(s)}``)."""
    known = dict(SHAREGPT_TAGS) if fmt == "sharegpt" else {}
    for role, names in (roles or {}).items():
        for name in [names] if isinstance(names, str) else names:
            known[name] = role
    return known


def convert_record(record, fmt, roles=None, fields=None):
    """Turn ``record.data`` (of format ``fmt``, not ``auto``) into the fields the task reads,
    in place; a DataError names the record's file:line."""
    data, where = record.data, record.where
    if fmt == "as-is":
        return record
    for name in REQUIRED[fmt]:
        if name not in data:
            raise DataError(f"{where}: a data.format: {fmt} record needs {name!r}; this one has "
                            f"{sorted(data)} (map other column names with data.columns)")
    if fmt in CONVERSATION:
        rest = {k: v for k, v in data.items() if k != CONVERSATION[fmt][0]}
        messages = conversation(data, fmt, roles, fields, where)
        system = _string(rest.pop("system", ""), '"system"', where) if fmt == "sharegpt" else ""
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        record.data = {**rest, "messages": messages}
    elif fmt == "alpaca":
        record.data = {k: v for k, v in data.items()
                       if k not in ("instruction", "input", "output", "system", "history")}
        record.data["messages"] = alpaca_messages(data, where)
    return record


def conversation(data, fmt, roles, fields, where):
    """The role/content turns of a record's conversation (``openai`` or ``sharegpt``)."""
    key, role_key, content_key = CONVERSATION[fmt]
    role_key, content_key = (fields or {}).get("role", role_key), \
        (fields or {}).get("content", content_key)
    turns, names = data[key], tags(fmt, roles)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns, got "
                        f"{_kind(turns)}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: {key}[{i}] must be an object with {role_key!r} and "
                            f"{content_key!r}, got {_kind(turn)} (name other fields with "
                            "data.message_fields: {role: ..., content: ...})")
        tag = turn[role_key]
        if fmt == "sharegpt" and tag not in names:
            raise DataError(f"{where}: {key}[{i}] has unknown role tag {tag!r}; known tags: "
                            f"{', '.join(names)} (map others with data.roles, e.g. "
                            f"{{assistant: {tag}}})")
        message = {k: v for k, v in turn.items() if k not in (role_key, content_key)}
        out.append({"role": names.get(tag, tag),
                    "content": _string(turn[content_key], f'{key}[{i}] "{content_key}"', where),
                    **message})
    return out


def alpaca_messages(data, where):
    """An Alpaca record's messages: [system,] the ``history`` pairs (LLaMA-Factory's earlier
    ``[instruction, response]`` turns), user (instruction [+ input]), assistant."""
    instruction = _string(data["instruction"], '"instruction"', where)
    extra = _string(data.get("input") or "", '"input"', where)
    system = _string(data.get("system") or "", '"system"', where)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    history = data.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h)
            for h in history):
        raise DataError(f"{where}: \"history\" must be a list of [instruction, response] "
                        f"string pairs, got {_kind(history)}")
    earlier = [{"role": role, "content": text} for pair in history
               for role, text in zip(("user", "assistant"), pair)]
    return ([{"role": "system", "content": system}] if system.strip() else []) + earlier + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _string(data["output"], '"output"', where)}]


def _string(value, name, where):
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {_kind(value)}")
    return value


def _kind(value):
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kind = {int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
    return f"{kind} {json.dumps(value, ensure_ascii=False, default=str)[:40]}"


def convert(records, section):
    """``records`` in the fields the task reads, per the recipe's ``data`` ``section``
    (``format``, ``roles``, ``message_fields``). Under ``auto`` a ``messages`` record is left
    as it is unless roles or message fields are mapped."""
    roles, fields = section.roles, section.message_fields
    for record in records:
        fmt = section.format
        if fmt == "auto":
            fmt = detect(record.data)
            if fmt == "openai" and not roles and not fields:
                continue
        convert_record(record, fmt, roles, fields)
    return records


def convert_splits(splits, section):
    """:func:`convert` on each split of a :class:`plugtune.Splits`; a streamed split
    (:class:`plugtune.data.Stream`) has each record converted as it is read."""
    from plugtune.data import Stream

    for name in ("train", "validation", "test"):
        split = getattr(splits, name, None) or []
        if isinstance(split, Stream):
            split.read = converting(split.read, section)
            if split.sources is not None:
                split.sources = [converting(read, section) for read in split.sources]
        else:
            convert(split, section)
    return splits


def converting(read, section):
    """A stream reader (``read() -> records``) whose records come converted."""
    def converted():
        for record in read():
            yield from convert([record], section)
    return converted
