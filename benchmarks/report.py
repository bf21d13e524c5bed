#!/usr/bin/env python
"""Turn a pytest-benchmark JSON file into a Markdown table (and a PNG bar chart of training-step
images/s per provider).

    pytest benchmarks/ --benchmark-only --benchmark-json out.json
    python benchmarks/report.py out.json                 # writes out.md and out.png beside it
    python benchmarks/report.py out.json --markdown results/cpu.md --png results/cpu.png
"""

import argparse
import json
import os
import re
import sys

COLUMNS = ["test", "case", "provider", "median", "images/s", "x reference", "x reference, interleaved", "GB/s", "TFLOP/s", "peak GB", "MFU %"]


def _fmt_time(seconds):
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _param(value):
    """pytest-benchmark writes objects it cannot serialise as UNSERIALIZABLE[repr]."""
    text = str(value)
    if text.startswith("UNSERIALIZABLE[") and text.endswith("]"):
        text = text[len("UNSERIALIZABLE["):-1]
    text = re.sub(r"device\(type='(\w+)'(?:, index=(\d+))?\)", lambda m: m.group(1) + (f":{m.group(2)}" if m.group(2) else ""), text)
    return text.replace("torch.", "")


def rows(data):
    out = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        params = bench.get("params") or {}
        name = bench["name"].split("[")[0].removeprefix("test_")
        if "dtype" in params and info.get("dtype"):  # the dtype the case ran in, where it says so
            params = {**params, "dtype": str(info["dtype"]).replace("torch.", "")}
        case = info.get("case") or ", ".join(f"{k}={_param(v)}" for k, v in params.items()
                                             if k not in ("provider", "variant", "device"))
        device = _param(params.get("device", ""))
        if device and not info.get("case"):
            case = f"{device}: {case}" if case else device
        provider = info.get("provider") or params.get("provider") or params.get("variant", "")
        out.append({
            "test": name, "case": case, "provider": provider, "median": _fmt_time(bench["stats"]["median"]),
            "images/s": info.get("images_per_s", ""), "x reference": info.get("ratio_to_reference", ""),
            "x reference, interleaved": info.get("ratio_to_reference_interleaved", ""),
            "GB/s": info.get("GB/s", ""), "TFLOP/s": info.get("TFLOP/s", ""), "peak GB": info.get("peak_memory_GB", ""), "MFU %": info.get("MFU_percent", ""),
        })
    return out


def machine(data):
    m = data.get("machine_info", {})
    devices = sorted({b.get("extra_info", {}).get("device", "") for b in data["benchmarks"]} - {""})
    torch_versions = sorted({b.get("extra_info", {}).get("torch", "") for b in data["benchmarks"]} - {""})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", ""))
    return (f"{', '.join(devices) or 'unknown device'}; host CPU {cpu} ({m.get('cpu', {}).get('count', '?')} cores); "
            f"torch {', '.join(torch_versions)}; {data.get('datetime', '')}")


def markdown(data):
    table = rows(data)
    used = [c for c in COLUMNS if any(str(r[c]) for r in table)]
    lines = [f"Machine: {machine(data)}", "", "| " + " | ".join(used) + " |", "|" + " --- |" * len(used)]
    lines += ["| " + " | ".join(str(r[c]) for c in used) + " |" for r in table]
    return "\n".join(lines) + "\n"


def bar_chart(data, path):
    """Horizontal bars of images/s for every training-step result; returns False when there are none."""
    from PIL import Image, ImageDraw

    bars = [(f"{r['case']} | {r['provider']}", float(r["images/s"])) for r in rows(data) if r["images/s"] != ""]
    if not bars:
        return False
    label_w, bar_w, row_h = 330, 420, 22
    img = Image.new("RGB", (label_w + bar_w + 90, row_h * (len(bars) + 2)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 4), "training step, images/s", fill="black")
    top = max(v for _, v in bars)
    for i, (label, value) in enumerate(bars):
        y = row_h * (i + 1) + 4
        draw.text((8, y + 4), label[:52], fill="black")
        width = int(bar_w * value / top)
        draw.rectangle([label_w, y, label_w + width, y + row_h - 6], fill=(70, 110, 180))
        draw.text((label_w + width + 6, y + 4), f"{value:.0f}", fill="black")
    img.save(path)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_file")
    parser.add_argument("--markdown", help="default: JSON path with .md")
    parser.add_argument("--png", help="default: JSON path with .png")
    args = parser.parse_args(argv)
    try:
        with open(args.json_file) as f:
            data = json.load(f)
        if not data.get("benchmarks"):
            raise ValueError("it holds no benchmark results (was the run made with --benchmark-disable?)")
    except (OSError, ValueError) as err:
        print(f"report: error: {args.json_file}: {err}", file=sys.stderr)
        return 2
    stem = os.path.splitext(args.json_file)[0]
    md_path, png_path = args.markdown or stem + ".md", args.png or stem + ".png"
    text = markdown(data)
    with open(md_path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {md_path}" + (f" and {png_path}" if bar_chart(data, png_path) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
