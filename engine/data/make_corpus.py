"""Regenerates corpus.txt, the text the tiny test models' BPE tokenizer is trained on.

Run once (`python engine/data/make_corpus.py`) and commit the output: the corpus is synthetic and seeded, so the
same script always writes the same file. It mixes English-like prose, code-like lines, numbers and punctuation with
accented Latin, CJK and emoji, so that the tokenizer learns merges inside multi-byte UTF-8 characters (which is what
exercises incremental detokenization).
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 20240611
TARGET_BYTES = 160_000

SUBJECTS = [
    "the scheduler",
    "a small robot",
    "my neighbour",
    "the old lighthouse keeper",
    "our build server",
    "the river",
    "a tired engineer",
    "the committee",
    "every queue",
    "the cat from Zürich",
    "a naïve parser",
    "the café owner",
    "the prefill node",
    "the decode worker",
    "a curious student",
    "the weather station",
    "this function",
    "the archive",
    "a distant radio",
    "the night train",
    "the façade",
    "Renée",
    "José",
    "the señor at the door",
]
VERBS = [
    "reads",
    "writes",
    "forgets",
    "measures",
    "repairs",
    "schedules",
    "paints",
    "counts",
    "sorts",
    "returns",
    "borrows",
    "explains",
    "ignores",
    "follows",
    "compresses",
    "rebuilds",
    "visits",
    "watches",
    "answers",
    "caches",
]
OBJECTS = [
    "the letters",
    "seven blocks of memory",
    "a broken clock",
    "the morning report",
    "every token",
    "the map",
    "a cup of coffee",
    "the crème brûlée",
    "the long table",
    "a list of numbers",
    "the key and the value",
    "an empty garden",
    "the last request",
    "twelve green apples",
    "the smörgåsbord",
    "a piñata",
    "the résumé",
    "the wrong door",
    "a quiet song",
    "the attention weights",
]
ADVERBS = [
    "slowly",
    "carefully",
    "again",
    "before noon",
    "without a word",
    "twice",
    "in the rain",
    "at midnight",
    "with great care",
    "as usual",
    "quickly",
    "under the bridge",
    "for no reason",
    "every Tuesday",
]
CONNECTORS = ["and then", "but", "because", "while", "although", "so", "until", "after"]
QUESTIONS = ["Why", "When", "How often", "Where", "Who"]

CJK_WORDS = [
    "東京",
    "大阪",
    "数据",
    "模型",
    "服务器",
    "缓存",
    "请求",
    "你好",
    "世界",
    "学习",
    "计算",
    "速度",
    "内存",
    "日本語",
    "中文",
    "天气",
    "时间",
    "文本",
    "解码",
    "预填充",
    "注意力",
    "ありがとう",
    "こんにちは",
    "カタカナ",
    "ひらがな",
    "한국어",
    "서울",
    "안녕하세요",
    "데이터",
]
CJK_SENTENCES = [
    "今天的天气很好。",
    "我们在东京见面。",
    "模型正在解码数据。",
    "服务器的内存不够了。",
    "请求已经完成。",
    "東京は大きい都市です。",
    "これはテストです。",
    "数据和模型都在缓存里。",
    "서울은 아름다운 도시입니다.",
    "计算速度非常快！",
    "你好，世界！",
    "注意力机制很重要。",
]
EMOJI = ["🚀", "🙂", "🎉", "🔥", "✨", "🐍", "🌍", "📦", "⚡", "🍕", "🤖", "❤️", "👍", "🧠", "☕", "🎵"]
ACCENTED = [
    "café",
    "naïve",
    "Zürich",
    "résumé",
    "über",
    "façade",
    "jalapeño",
    "São Paulo",
    "Kraków",
    "Ångström",
    "déjà vu",
    "coöperate",
    "Øresund",
    "Málaga",
    "straße",
    "Łódź",
    "Ελλάδα",
    "Москва",
    "привет",
    "Ωμέγα",
]
IDENTIFIERS = [
    "block_table",
    "num_tokens",
    "seq_len",
    "kv_cache",
    "request_id",
    "logits",
    "temperature",
    "top_p",
    "hidden_states",
    "positions",
    "slot_mapping",
    "batch",
    "scheduler",
    "prefix_hash",
    "max_tokens",
    "stream",
]
FUNCTIONS = ["allocate", "free", "step", "decode", "prefill", "sample", "encode", "flush", "append", "evict"]


def _sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ADVERBS)}"
    if rng.random() < 0.35:
        text += f", {rng.choice(CONNECTORS)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", ".", ".", "!", "?", "...", ";"])


def _base_form(verb: str) -> str:
    return verb[:-2] if verb.endswith(("ches", "shes", "sses")) else verb[:-1]


def _question(rng: random.Random) -> str:
    return f"{rng.choice(QUESTIONS)} does {rng.choice(SUBJECTS)} {_base_form(rng.choice(VERBS))} {rng.choice(OBJECTS)}?"


def _numbers(rng: random.Random) -> str:
    choices = [
        f"In {rng.randint(1900, 2030)}, {rng.randint(2, 999)} people paid ${rng.randint(1, 500)}.{rng.randint(0, 99):02d} each.",
        f"The ratio was {rng.random():.3f} and the total {rng.randint(0, 10**6):,} units ({rng.randint(1, 100)}%).",
        f"Call +{rng.randint(1, 99)} {rng.randint(100, 999)}-{rng.randint(1000, 9999)} before {rng.randint(1, 12)}:{rng.randint(0, 59):02d}.",
        f"Version {rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)} fixed issue #{rng.randint(1, 9999)}.",
        f"Temperature: {rng.uniform(-20, 40):.1f}°C, humidity {rng.randint(10, 99)}%, wind {rng.randint(0, 90)} km/h.",
    ]
    return rng.choice(choices)


def _code(rng: random.Random) -> str:
    a, b = rng.sample(IDENTIFIERS, 2)
    fn = rng.choice(FUNCTIONS)
    choices = [
        f"def {fn}_{a}({a}: int, {b}: list[int]) -> int:\n    return {a} + len({b})",
        f"for i in range({rng.randint(1, 64)}):\n    {a}[i] = {b}[i] * {rng.randint(2, 9)}",
        f'if {a} is None or {b} >= {rng.randint(0, 4096)}:\n    raise ValueError("bad {a}")',
        f'{a} = {{"{b}": {rng.randint(0, 99)}, "name": "{rng.choice(ACCENTED)}"}}',
        f"self.{a}.{fn}({b}=[{', '.join(str(rng.randint(0, 99)) for _ in range(rng.randint(1, 5)))}])",
        f"// {fn} the {a} before touching {b}\nint {a} = {b} << {rng.randint(1, 8)};",
        f'print(f"{{{a}}} -> {{{b}:.2f}}")  # {rng.choice(EMOJI)}',
        f"$ splitserve {fn} --{a.replace('_', '-')}={rng.randint(1, 512)} && echo ok",
    ]
    return rng.choice(choices)


def _multilingual(rng: random.Random) -> str:
    choices = [
        f"{rng.choice(CJK_SENTENCES)} {rng.choice(EMOJI)}",
        f"We met at a {rng.choice(ACCENTED)} near {rng.choice(CJK_WORDS)} and said {rng.choice(CJK_WORDS)}.",
        f"{rng.choice(CJK_WORDS)}{rng.choice(CJK_WORDS)}（{rng.choice(CJK_WORDS)}）、{rng.choice(CJK_WORDS)}。",
        f"Launch day {rng.choice(EMOJI)}{rng.choice(EMOJI)}: {rng.choice(ACCENTED)}, {rng.choice(ACCENTED)} and more!",
        f"{rng.choice(EMOJI)} {rng.choice(CJK_SENTENCES)} {rng.choice(ACCENTED)} {rng.choice(EMOJI)}",
        f"「{rng.choice(CJK_WORDS)}」は{rng.choice(CJK_WORDS)}です。 {rng.choice(EMOJI)}",
    ]
    return rng.choice(choices)


def _paragraph(rng: random.Random) -> str:
    makers = [_sentence] * 6 + [
        _question,
        _numbers,
        _numbers,
        _code,
        _code,
        _multilingual,
        _multilingual,
        _multilingual,
    ]
    kind = rng.random()
    if kind < 0.2:
        return "\n".join(_code(rng) for _ in range(rng.randint(2, 5)))
    return " ".join(rng.choice(makers)(rng) for _ in range(rng.randint(2, 6)))


def make_corpus(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < target_bytes:
        paragraph = _paragraph(rng)
        parts.append(paragraph)
        size += len(paragraph.encode()) + 2
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    out = Path(__file__).with_name("corpus.txt")
    out.write_text(make_corpus(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
