#!/usr/bin/env python3
"""Summarises one tools/gpu/device-check.sh run: reads its folder (device.txt, parity-*.log,
ipcompose.jsonl, diffusers.jsonl), writes report.json there and prints report.md's text.

Usage: python3 tools/gpu/report.py OUT_DIR
"""

import json
import re
import sys
from pathlib import Path

TEST_LINE = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", re.M)
DIFF_LINE = re.compile(r"^(.*(?:max abs diff|differ).*)$", re.M)
DTYPES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}


def parity(path):
    """Per-dtype test outcomes and the printed differences of one parity log."""
    if not path.exists():
        return {}
    text = path.read_text(errors="replace")
    # parity-half.log holds several dtypes, each after a `=== dtype X` line.
    parts = re.split(r"^=== dtype (\S+)$", text, flags=re.M)
    if len(parts) == 1:
        sections = {"f32": text}
    else:
        sections = dict(zip(parts[1::2], parts[2::2]))
    out = {}
    for dtype, body in sections.items():
        tests = TEST_LINE.findall(body)
        out[dtype] = {
            "passed": sum(1 for _, r in tests if r == "ok"),
            "failed": [name for name, r in tests if r == "FAILED"],
            "diffs": [line.strip() for line in DIFF_LINE.findall(body)][:200],
            "exit": (re.findall(r"^exit (\d+)", body, re.M) or ["?"])[-1],
        }
    return out


def rows(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main():
    out = Path(sys.argv[1])
    device = (out / "device.txt").read_text(errors="replace") if (out / "device.txt").exists() else ""
    report = {
        "device": device,
        "parity": {**parity(out / "parity-f32.log"), **parity(out / "parity-half.log")},
        "bench": [],
    }
    ipc, dif = rows(out / "ipcompose.jsonl"), rows(out / "diffusers.jsonl")
    for r in ipc:
        torch_dtype = DTYPES.get(r.get("dtype"), r.get("dtype"))
        d = next((d for d in dif if d["name"] == r["name"] and d.get("dtype") == torch_dtype), None)
        if r["name"] == "precision":
            report.setdefault("precision", []).append(r)
            continue
        report["bench"].append({
            "tool": r.get("tool", "ipcompose"),
            "figure": r["name"],
            "dtype": r.get("dtype"),
            "ipcompose_s": r["median_s"],
            "diffusers_s": d["median_s"] if d else None,
            "ratio": r["median_s"] / d["median_s"] if d else None,
            "host_to_device_bytes_per_call": r.get("host_to_device_bytes_per_call"),
            "device_to_host_bytes_per_call": r.get("device_to_host_bytes_per_call"),
            "diffusers_peak_gpu_bytes": d.get("peak_gpu_bytes") if d else None,
        })
    (out / "report.json").write_text(json.dumps(report, indent=1))

    print("# GPU device check\n")
    print("```\n" + device.strip() + "\n```\n")
    print("## Parity on the GPU\n")
    print("| dtype | passed | failed | exit |\n| --- | --- | --- | --- |")
    for dtype, p in report["parity"].items():
        print(f"| {dtype} | {p['passed']} | {', '.join(p['failed']) or '-'} | {p['exit']} |")
    for dtype, p in report["parity"].items():
        print(f"\n{dtype} differences:\n")
        for line in p["diffs"][:60]:
            print(f"    {line}")
    print("\n## Speed (median s; ratio = ipcompose / diffusers, same card, same run)\n")
    print("| build | figure | dtype | ipcompose s | diffusers s | ratio | H->D B/call | D->H B/call |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in report["bench"]:
        ds = f"{b['diffusers_s']:.4f}" if b["diffusers_s"] else "n/a"
        ratio = f"{b['ratio']:.2f}x" if b["ratio"] else "n/a"
        print(f"| {b['tool']} | {b['figure']} | {b['dtype']} | {b['ipcompose_s']:.4f} | {ds} | {ratio} | "
              f"{b['host_to_device_bytes_per_call']} | {b['device_to_host_bytes_per_call']} |")
    for p in report.get("precision", []):
        print(f"\nfull-size UNet forward, {p['dtype']} vs f32 on the same weights and inputs: "
              f"max {p['relative_max_vs_f32']:.2e} relative, L2 {p['relative_l2_vs_f32']:.2e}")
    missing = [d["name"] + "/" + str(d.get("dtype")) for d in dif
               if not any(r["name"] == d["name"] and DTYPES.get(r.get("dtype")) == d.get("dtype")
                          and r.get("tool", "ipcompose") == "ipcompose" for r in ipc)]
    if missing:
        print(f"\ndiffusers-only figures (ipcompose failed or timed out): {', '.join(missing)}")


if __name__ == "__main__":
    main()
