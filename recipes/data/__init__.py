"""Small datasets the shipped recipes use, and the scripts that generate them."""
import json


def write_jsonl(path, rows):
    """Write ``rows`` as JSON Lines, UTF-8 kept as is (the generators' one output format)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
