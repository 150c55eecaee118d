"""ShareGPT conversations (JSON list, or JSONL, of ``{"id", "conversations": [{"from", "value"}]}``).

No arrival times (use workload.arrival=poisson/gamma). Token counts:
  - exact when a message carries ``token_ids`` (a list of ids; then prefix ids are exact too);
  - else a tokenizer-free estimate: ceil(non-CJK characters / 4) + CJK characters. Four
    characters per token is OpenAI's published rule of thumb for English text with BPE
    vocabularies; Llama/GPT-4 vocabularies spend about one token per Chinese/Japanese/Korean
    character. It is an estimate (code and other languages differ), recorded as such.
  Chat-template tokens between messages are not counted (they depend on the model).

``turns=first`` (default, as vLLM's ShareGPT sampler): one request per conversation, prompt =
its first message, output = its second. ``turns=all``: one request per assistant answer that
follows a user message, prompt = the whole conversation before it; the conversation is the
session, and its turns share their prefix (block i of a conversation is the same content in
every one of its turns). Conversations with fewer than 2 messages are skipped (as vLLM does).
"""
from __future__ import annotations

import json
import math
import re

import pandas as pd

from profiler.traces.common import Trace, bad, check_counts, stream_block_hashes, token_block_hashes

OPTIONS = {"turns": "first", "hash_block_tokens": 16, "drop_empty": False}
USER = {"human", "user"}
ASSISTANT = {"gpt", "assistant", "chatgpt", "bing", "bard", "model"}
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
ESTIMATE_RULE = "ceil(non-CJK characters / 4) + CJK characters"


def estimate_tokens(text: str) -> int:
    if not text or not text.strip():
        return 0
    cjk = len(CJK.findall(text))
    return math.ceil((len(text) - cjk) / 4) + cjk


def detect(path, head: str) -> bool:
    return '"conversations"' in head


def _load(path, where: str) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        try:
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise bad(where, f"neither a JSON list nor JSON lines ({exc.msg})") from None
    if not isinstance(doc, list) or not doc:
        raise bad(where, "expected a non-empty list of conversations")
    return doc


def _message_tokens(m, where: str, label: str) -> tuple[int, list | None]:
    if not isinstance(m, dict) or "value" not in m and "token_ids" not in m:
        raise bad(where, f"{label}: a message needs 'from' and 'value' (or 'token_ids')")
    ids = m.get("token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise bad(where, f"{label}: token_ids must be a list of integer ids")
        return len(ids), ids
    if not isinstance(m["value"], str):
        raise bad(where, f"{label}: 'value' must be text")
    return estimate_tokens(m["value"]), None


def read(path, opts: dict) -> Trace:
    where, mode, block = path.name, opts["turns"], int(opts["hash_block_tokens"])
    if mode not in ("first", "all"):
        raise bad("turns", f"{mode!r}; choose first (one request per conversation, as vLLM) or all (every turn)")
    if block < 1:
        raise bad("hash_block_tokens", f"must be >= 1, got {block}")
    rows, labels, skipped, exact, estimated = [], [], 0, 0, 0
    for ci, conv in enumerate(_load(path, where)):
        cid = conv.get("id", ci) if isinstance(conv, dict) else ci
        if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
            raise bad(where, f"conversation {ci} (id {cid!r}): missing key 'conversations' (a list of messages)")
        msgs = conv["conversations"]
        if len(msgs) < 2:
            skipped += 1
            continue
        toks = [_message_tokens(m, where, f"conversation {ci} (id {cid!r}) message {k}") for k, m in enumerate(msgs)]
        exact += sum(ids is not None for _, ids in toks)
        estimated += sum(ids is None for _, ids in toks)
        if mode == "first":
            rows.append({"num_prefill_tokens": toks[0][0], "num_decode_tokens": toks[1][0]})
            labels.append(f"conversation {ci} (id {cid!r}) message 0/1")
            continue
        turn, before, stream_ids = 0, 0, []
        exact_ids = all(ids is not None for _, ids in toks)
        for k, (m, (n, ids)) in enumerate(zip(msgs, toks)):
            role = str(m.get("from", "")).lower()
            prev_role = str(msgs[k - 1].get("from", "")).lower() if k else ""
            if role in ASSISTANT and prev_role in USER | {"system"} and k:
                hashes = (token_block_hashes(stream_ids, block) if exact_ids
                          else stream_block_hashes(f"sharegpt/{ci}", before // block))
                rows.append({"num_prefill_tokens": before, "num_decode_tokens": n, "session_id": ci,
                             "turn": turn, "prefix_hashes": hashes})
                labels.append(f"conversation {ci} (id {cid!r}) message {k}")
                turn += 1
            before += n
            if exact_ids:
                stream_ids += ids
    if not rows:
        raise bad(where, "no conversation with at least two messages")
    meta = {"description": "ShareGPT conversations (user/assistant message texts)", "turns": mode,
            "conversations_skipped_fewer_than_2_messages": skipped,
            "length_source": {"exact_messages": exact, "estimated_messages": estimated,
                              "estimate_rule": ESTIMATE_RULE if estimated else None},
            "assumptions": ["no arrival times: use workload.arrival=poisson or gamma",
                            "chat-template tokens between messages are not counted"]}
    if estimated:
        meta["assumptions"].append(f"token counts estimated without a tokenizer: {ESTIMATE_RULE}")
    frame = pd.DataFrame(rows)
    frame = check_counts(frame, where, lambda i: labels[i], opts["drop_empty"], meta)
    frame = frame.reset_index(drop=True)
    if mode == "all":
        frame["session_id"] = frame["session_id"].astype("int64")
        frame["turn"] = frame["turn"].astype("int32")
        meta["assumptions"].append("sessions: a conversation; turn k's prompt = every message before answer k; "
                                   f"prefix ids per full {block}-token block of the conversation, chained "
                                   + ("(exact, from token_ids)" if estimated == 0 else "(by position)"))
        return Trace(frame, meta, block)
    return Trace(frame, meta)
