#!/usr/bin/env python3
"""The Python side of `ipcompose bench --figures preprocess`: each preprocessor as the reference
annotators run it (controlnet_aux 0.0.10, OpenCV, transformers), on the same photograph, printing
the same JSON lines (name, median_s, min_s, max_s, repeats, ...).

  preprocess_canny         controlnet_aux `CannyDetector()(img, 100, 200, detect_resolution=512,
                           image_resolution=512)` (resize_image, cv2.Canny, HWC3, INTER_LINEAR)
  preprocess_blur          cv2.resize INTER_AREA down by 4, then INTER_LANCZOS4 back up (the tile
                           blur ipcompose implements; controlnet_aux 0.0.10 has no such detector)
  preprocess_shuffle       controlnet_aux `ContentShuffleDetector()(img, detect_resolution=512,
                           image_resolution=512)`
  preprocess_depth         transformers `DepthAnythingForDepthEstimation` with the Depth Anything
                           V2 Small config and random weights (its own init), run as the original
                           repository's `infer_image` and the depth annotator do: /255 in float64,
                           cv2 INTER_CUBIC to 518 (lower bound, multiples of 14), ImageNet
                           normalisation, forward, bilinear align_corners back to the image size,
                           min-max to uint8, three channels
  preprocess_pose_network  controlnet_aux's `bodypose_model` (full size) alone, on the tensor
                           `Body.__call__` makes from the photograph at detect resolution 512
  preprocess_pose          controlnet_aux `OpenposeDetector(Body)(img, detect_resolution=512,
                           image_resolution=512)`, body only

The pose network gets the same weights as `ipcompose bench` gives its model: a fixed pattern
(splitmix64 of tensor index and value index, see `pattern` and bench.rs `pattern_value`), so both
post-processings see about the same peaks ("candidates", "people" in the JSON lines). The depth
map's cost does not depend on the weights. Nothing is downloaded.

Usage (from the repository root):
  .venv/bin/python tools/bench_preprocess.py --json --threads 2 --repeats 5
  .venv/bin/python tools/bench_preprocess.py --compare ipcompose.jsonl python.jsonl
"""

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "tools/bench-inputs/photo512.png"
FIGURES = ["preprocess_canny", "preprocess_blur", "preprocess_shuffle", "preprocess_depth",
           "preprocess_pose_network", "preprocess_pose"]
TINY_SIDE = 128
BLUR_FACTOR = 4.0
# As bench.rs: POSE_BIAS_BOUND, POSE_HEATMAP_BIAS_OFFSET.
POSE_BIAS_BOUND = 0.05
POSE_HEATMAP_BIAS_OFFSET = -1.0
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def peak_rss_bytes():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pattern(np, seed, n, bound, offset):
    """bench.rs `pattern_value` for i in 0..n: splitmix64(seed << 32 + i), top 53 bits / 2**53,
    (2u - 1) * bound + offset in float64, then float32."""
    u64 = np.uint64
    z = (u64(seed) << u64(32)) + np.arange(n, dtype=np.uint64) + u64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
    z = z ^ (z >> u64(31))
    unit = (z >> u64(11)).astype(np.float64) * (1.0 / 2.0 ** 53)
    return ((2.0 * unit - 1.0) * np.float64(np.float32(bound)) + np.float64(np.float32(offset))).astype(np.float32)


def pose_state_dict(model, np, torch):
    """`model`'s state dict with the pattern weights: tensors in order of their original names
    (`conv1_1.weight`, ...; the `model0.`-style prefixes dropped), tensor i from seed i."""
    state = model.state_dict()
    original = {key.split(".", 1)[1]: key for key in state}
    out = {}
    for seed, name in enumerate(sorted(original)):
        shape = state[original[name]].shape
        if name.endswith(".weight"):
            fan_in = int(np.prod(shape[1:]))
            bound, offset = (6.0 / fan_in) ** 0.5, 0.0
        elif name == "Mconv7_stage6_L2.bias":
            bound, offset = POSE_BIAS_BOUND, POSE_HEATMAP_BIAS_OFFSET
        else:
            bound, offset = POSE_BIAS_BOUND, 0.0
        n = int(np.prod(shape))
        out[original[name]] = torch.from_numpy(pattern(np, seed, n, bound, offset).reshape(tuple(shape)))
    return out


def depth_config(tiny):
    from transformers import DepthAnythingConfig, Dinov2Config

    if tiny:
        hidden, layers, heads, out_indices, neck, fusion, head = 32, 4, 2, [1, 2, 3, 4], [8, 16, 24, 32], 16, 8
    else:
        # Depth-Anything-V2-Small-hf (bench.rs: DepthAnythingVariant::Small.config()).
        hidden, layers, heads, out_indices, neck, fusion, head = 384, 12, 6, [3, 6, 9, 12], [48, 96, 192, 384], 64, 32
    backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                            patch_size=14, image_size=518, layer_norm_eps=1e-6, out_indices=out_indices,
                            apply_layernorm=True, reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=hidden,
                               reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=neck, fusion_hidden_size=fusion,
                               head_hidden_size=head, head_in_index=-1, depth_estimation_type="relative")


def compare(rust_path, python_path):
    """Both tools' medians side by side with the ratio ipcompose / Python."""
    def read(path):
        return {r["name"]: r for r in map(json.loads, Path(path).read_text().splitlines()) if r}

    rust, py = read(rust_path), read(python_path)
    print(f"{'figure':<24} {'ipcompose s':>12} {'Python s':>10} {'ratio':>7}")
    for name, r in rust.items():
        p = py.get(name)
        if p is not None:
            print(f"{name:<24} {r['median_s']:>12.4f} {p['median_s']:>10.4f} {r['median_s'] / p['median_s']:>6.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--figures", default="preprocess", help="comma separated: preprocess (all) or " + ",".join(FIGURES))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and cv2.setNumThreads (default 2)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--tiny", action="store_true",
                        help="a 128x128 copy of the photograph, a narrow depth network, no pose figures")
    parser.add_argument("--compare", nargs=2, metavar=("IPCOMPOSE_JSONL", "PYTHON_JSONL"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    figures = []
    for f in (f.strip() for f in args.figures.split(",") if f.strip()):
        figures.extend(FIGURES if f == "preprocess" else [f])
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure(s) {unknown} (valid: preprocess, {', '.join(FIGURES)})")
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")

    warnings.filterwarnings("ignore")
    import cv2
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    import controlnet_aux
    import transformers
    from controlnet_aux import CannyDetector, ContentShuffleDetector
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.model import bodypose_model
    from controlnet_aux.util import HWC3, resize_image
    from transformers import DepthAnythingForDepthEstimation

    image = np.array(Image.open(args.image).convert("RGB"))
    if args.tiny:
        image = cv2.resize(image, (TINY_SIDE, TINY_SIDE), interpolation=cv2.INTER_AREA)
    detect = TINY_SIDE if args.tiny else 512
    depth_input_size = 8 * 14 if args.tiny else 518
    height, width = image.shape[:2]
    info = {"tool": "python", "threads": torch.get_num_threads(), "width": width, "height": height,
            "tiny": args.tiny, "warmup": args.warmup, "torch": torch.__version__, "opencv": cv2.__version__,
            "controlnet_aux": controlnet_aux.__version__, "transformers": transformers.__version__}
    if not args.json:
        print(f"Python preprocessors on {args.image} ({width}x{height}), detect resolution {detect}, "
              f"{info['threads']} thread(s), torch {torch.__version__}, OpenCV {cv2.__version__}, "
              f"controlnet_aux {controlnet_aux.__version__}")
    results = []

    def measure(name, once, **extra):
        if not args.json:
            print(f"measuring {name} ({args.warmup} warm-up + {args.repeats} timed)…", file=sys.stderr, flush=True)
        reset_peak_rss()
        for _ in range(args.warmup):
            once()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            once()
            times.append(time.perf_counter() - started)
        row = {**info, "name": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
               "repeats": len(times), "peak_rss_bytes": peak_rss_bytes(), **extra}
        results.append(row)
        if args.json:
            print(json.dumps(row, sort_keys=True), flush=True)
        else:
            print(f"  median {row['median_s']:.4f} s", file=sys.stderr, flush=True)

    with torch.inference_mode():
        if "preprocess_canny" in figures:
            canny = CannyDetector()
            measure("preprocess_canny", lambda: canny(image, 100, 200, detect_resolution=detect,
                                                      image_resolution=detect, output_type="np"),
                    detect_resolution=detect)

        if "preprocess_blur" in figures:
            def blur():
                small = (max(1, round(width / BLUR_FACTOR)), max(1, round(height / BLUR_FACTOR)))
                down = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
                return cv2.resize(down, (width, height), interpolation=cv2.INTER_LANCZOS4)

            measure("preprocess_blur", blur, detect_resolution=None)

        if "preprocess_shuffle" in figures:
            shuffle = ContentShuffleDetector()
            np.random.seed(0)
            measure("preprocess_shuffle", lambda: shuffle(image, detect_resolution=detect, image_resolution=detect,
                                                          output_type="np"),
                    detect_resolution=detect)

        if "preprocess_depth" in figures:
            torch.manual_seed(0)
            model = DepthAnythingForDepthEstimation(depth_config(args.tiny)).eval()

            def network_size(w, h):
                scale = max(depth_input_size / h, depth_input_size / w)

                def side(x):
                    y = int(np.round(x / 14) * 14)
                    return int(np.ceil(x / 14) * 14) if y < depth_input_size else y

                return side(scale * w), side(scale * h)

            def depth_map():
                # The annotator hands infer_image BGR and image2tensor converts it back to RGB.
                bgr = image[:, :, ::-1]
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) / 255.0
                w, h = network_size(width, height)
                x = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC)
                x = (x - MEAN) / STD
                x = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (2, 0, 1))).astype(np.float32)[None])
                depth = model(pixel_values=x).predicted_depth
                d = torch.nn.functional.interpolate(depth[:, None], (height, width), mode="bilinear",
                                                    align_corners=True)[0, 0].numpy()
                d = ((d - d.min()) / (d.max() - d.min()) * 255.0).astype(np.uint8)
                return np.repeat(d[:, :, None], 3, axis=2)

            measure("preprocess_depth", depth_map, input_size=depth_input_size,
                    network_input=list(network_size(width, height)))
            del model

        pose_figures = {"preprocess_pose_network", "preprocess_pose"}
        if pose_figures & set(figures) and args.tiny:
            print("note: the pose figures have no --tiny network on the Python side; skipped", file=sys.stderr)
        elif pose_figures & set(figures):
            body = Body.__new__(Body)
            body.model = bodypose_model().eval()
            body.model.load_state_dict(pose_state_dict(body.model, np, torch))
            detector = OpenposeDetector(body)
            # Body.__call__'s network input for the photograph at the detect resolution (the
            # detector's detect_poses hands it the image in BGR), captured from one untimed call.
            seen = {}
            forward = body.model.forward

            def capture(x):
                seen["input"] = x
                return forward(x)

            body.model.forward = capture
            candidate, subset = body(resize_image(HWC3(image), detect)[:, :, ::-1].copy())
            body.model.forward = forward
            data = seen["input"]
            found = {"detect_resolution": detect, "network_input": [data.shape[3], data.shape[2]],
                     "candidates": len(candidate), "people": len(subset)}
            if "preprocess_pose_network" in figures:
                measure("preprocess_pose_network", lambda: body.model(data), **found)
            if "preprocess_pose" in figures:
                measure("preprocess_pose", lambda: detector(image, detect_resolution=detect, image_resolution=detect,
                                                            output_type="np"), **found)

    if not args.json:
        print(f"\n{'figure':<24} {'median s':>10} {'min s':>10} {'max s':>10} {'repeats':>8}")
        for r in results:
            print(f"{r['name']:<24} {r['median_s']:>10.4f} {r['min_s']:>10.4f} {r['max_s']:>10.4f} {r['repeats']:>8}")


if __name__ == "__main__":
    main()
