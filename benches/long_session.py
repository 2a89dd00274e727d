#!/usr/bin/env python3
"""Writes a Leanplum session export of ONE session line of about --mb MiB (default 63: just
under the default watch.max_line_bytes of 64 MiB): --events app events, each with parameters,
spread over states, and --engagements message engagements (`.m<id> Open`, `Delivered`,
`Click`, `Bounce`) naming messages of examples/catalog, each mapping to one Segment event.

    python3 benches/long_session.py /tmp/long-session.jsonl
    /usr/bin/time -v target/release/leanplum-segment-agent dry-run \
        --config examples/config.toml /tmp/long-session.jsonl > /dev/null

The figures in BENCHMARKS.md ("one session of 62 MiB on one line") come from this file.
"""

import argparse
import json
import random

# Catalog messages and actions that each give exactly one Segment event.
ENGAGEMENTS = [
    ("5680127476129675", "Open"),
    ("5175843646007627", "Delivered"),
    ("4350571203541773", "Open"),
    ("6634839652083743", "Click"),
    ("4841313454908857", "Bounce"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mb", type=float, default=63.0, help="approximate line size in MiB")
    ap.add_argument("--events", type=int, default=50_000, help="app events")
    ap.add_argument("--engagements", type=int, default=48, help="message engagements")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rnd = random.Random(args.seed)

    target = int(args.mb * (1 << 20))
    # Leave room for the envelope and the engagements; the rest is app events' parameters.
    per_event = max(0, (target - 2000 - args.engagements * 200) // max(1, args.events) - 170)
    start = 1_793_800_000.0
    events = []
    for i in range(args.events):
        note = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(per_event * 2 // 3))
        events.append({
            "eventId": 7_300_000_000_000_000_000 + i,
            "name": rnd.choice(["Add To Cart", "Level Up", "View Item", "Search"]),
            "time": start + i * 0.25,
            "value": round(rnd.random() * 10, 2),
            "parameters": {
                "sku": f"SKU-{i:08d}",
                "query": note,
                "tags": [note[: per_event // 6], note[per_event // 6 : per_event // 3]],
                "qty": rnd.randint(1, 9),
            },
        })
    step = max(1, args.events // max(1, args.engagements))
    for k in range(args.engagements):
        message, action = ENGAGEMENTS[k % len(ENGAGEMENTS)]
        event = {
            "eventId": 7_390_000_000_000_000_000 + k,
            "name": f".m{message} {action}",
            "time": start + k * step * 0.25 + 0.1,
            "value": 0.0,
        }
        if action == "Click":
            event["parameters"] = {"url": f"https://example.com/long/{k}", "index": k % 5}
        events.insert(min(len(events), k * step + k), event)
    states = [{"stateId": s, "events": events[s * 500 : (s + 1) * 500]}
              for s in range((len(events) + 499) // 500)]
    session = {
        "sessionId": "7300000000000001",
        "userId": "long-user",
        "deviceId": "LONG-DEVICE-0001",
        "time": start,
        "locale": "en_US",
        "timezone": "Europe/Berlin",
        "country": "DE",
        "appVersion": "4.2.0",
        "systemName": "Android",
        "systemVersion": "14",
        "deviceModel": "Pixel 8",
        "experiments": [],
        "states": states,
    }
    line = json.dumps(session, separators=(",", ":"))
    with open(args.out, "w") as f:
        f.write(line)
        f.write("\n")
    print(f"{args.out}: one line of {len(line):,} bytes, {args.events} app events, "
          f"{args.engagements} engagements")


if __name__ == "__main__":
    main()
