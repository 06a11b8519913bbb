#!/usr/bin/env python3
"""diffusers' side of `ipcompose bench`: the same figures, shapes and JSON lines, measured with
torch + diffusers (fp32, CPU) on models built from the same configs with random weights.

The full-size configs are read out of crates/cli/src/bench.rs, so both tools always build the
same models; `--tiny` reads the test fixtures' configs as `ipcompose bench --tiny` does.

Each figure runs as diffusers' own pipelines run it:
  unet_step       one UNet2DConditionModel forward, batch 2 (CFG), 77 text tokens;
  unet_step_ip    with one plain IP-Adapter loaded by `unet._load_ip_adapter_weights` (ip-adapter_sd15
                  shapes): the image projection and to_k_ip/to_v_ip run inside every forward, as in
                  diffusers' pipelines;
  unet_step_cn1/2 one / two ControlNetModel forwards (control image repeated to batch 2, as the
                  pipeline does) and the UNet with the summed residuals;
  cn_skipped      a step outside the ControlNet's window: diffusers' pipeline still runs the
                  ControlNet, with conditioning_scale 0, so this costs what unet_step_cn1 does;
  run_20          the denoising loop (DDIM, --steps) plus the VAE decode;
  load            UNet2DConditionModel.from_pretrained of a safetensors folder just written; the
                  weights stay memory-mapped and are read on the first forward (ipcompose copies
                  them while loading), so this is less work than ipcompose's `load`.

Usage (from the repository root):
  .venv/bin/python tools/bench_diffusers.py --json --threads 2 --repeats 3 \
      --figures unet_step,unet_step_ip,unet_step_cn1,unet_step_cn2,cn_skipped,load
  .venv/bin/python tools/bench_diffusers.py --compare ipcompose.jsonl diffusers.jsonl
"""

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_RS = ROOT / "crates/cli/src/bench.rs"
FIXTURES = ROOT / "tests/fixtures"

FIGURES = ["load", "unet_step", "unet_step_ip", "unet_step_cn1", "cn_skipped", "unet_step_cn2", "run_20"]
DEFAULT_FIGURES = "load,unet_step,unet_step_ip,unet_step_cn1,cn_skipped,unet_step_cn2"
TEXT_TOKENS = 77
IP_TOKENS = 4
TIMESTEP = 500
GUIDANCE_SCALE = 7.5


def rust_config(name):
    """A JSON config embedded in bench.rs as `const NAME: &str = r#"..."#;`."""
    text = BENCH_RS.read_text()
    match = re.search(r"const " + name + r': &str = r#"(.*?)"#;', text, re.S)
    if match is None:
        sys.exit(f"{BENCH_RS}: no config constant {name}")
    return json.loads(match.group(1))


def configs(tiny):
    if tiny:
        read = lambda p: json.loads((FIXTURES / p).read_text())  # noqa: E731
        return {
            "unet": read("tiny-sd15/unet/config.json"),
            "controlnet": read("controlnet/tiny-canny/config.json"),
            "vae": read("tiny-sd15/vae/config.json"),
            "scheduler": read("tiny-sd15/scheduler/scheduler_config.json"),
            "image_embedding_width": 32,
        }
    return {
        "unet": rust_config("SD15_UNET_CONFIG"),
        "controlnet": rust_config("SD15_CONTROLNET_CONFIG"),
        "vae": rust_config("SD15_VAE_CONFIG"),
        "scheduler": rust_config("SD15_SCHEDULER_CONFIG"),
        "image_embedding_width": 1024,
    }


def reset_peak_rss():
    """Clears the kernel's peak-RSS record (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compare(rust_path, diffusers_path):
    """Prints both tools' medians side by side with the ratio ipcompose / diffusers."""
    def read(path):
        return {row["name"]: row for row in map(json.loads, Path(path).read_text().splitlines()) if row}

    rust, torch_rows = read(rust_path), read(diffusers_path)
    print(f"{'figure':<15} {'ipcompose s':>12} {'diffusers s':>12} {'ratio':>7} {'ipc RSS GiB':>12} {'diff RSS GiB':>13}")
    gib = lambda b: f"{b / 2**30:.2f}" if b else "n/a"  # noqa: E731
    for name, r in rust.items():
        d = torch_rows.get(name)
        if d is None:
            continue
        ratio = r["median_s"] / d["median_s"]
        print(f"{name:<15} {r['median_s']:>12.3f} {d['median_s']:>12.3f} {ratio:>6.2f}x "
              f"{gib(r['peak_rss_bytes']):>12} {gib(d['peak_rss_bytes']):>13}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--figures", default=DEFAULT_FIGURES, help="comma separated: " + ",".join(FIGURES))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="the tiny test models")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU script's comparison)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="weights and activations (fp16 is diffusers' usual GPU setting)")
    parser.add_argument("--compare", nargs=2, metavar=("IPCOMPOSE_JSONL", "DIFFUSERS_JSONL"),
                        help="print the two tools' figures side by side and exit")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    figures = ["run_20" if f == "run" else f for f in figures]
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure(s) {unknown} (valid: {', '.join(FIGURES)})")
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    cfg = configs(args.tiny)
    latent_factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    side = cfg["unet"].get("sample_size", 64) * latent_factor
    width, height = args.width or side, args.height or side
    h, w = height // latent_factor, width // latent_factor
    info = {
        "tool": "diffusers",
        "threads": torch.get_num_threads(),
        "width": width,
        "height": height,
        "tiny": args.tiny,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": args.device,
        "dtype": args.dtype,
    }
    if not args.json:
        print(f"diffusers bench: {width}x{height} (latents {w}x{h}), CFG batch 2, {TEXT_TOKENS} text tokens, "
              f"{args.dtype} {args.device}, {info['threads']} thread(s), torch {torch.__version__}, diffusers {diffusers.__version__}")
    results = []

    def report(name, times, peak, **extra):
        row = {**info, "name": name, "median_s": statistics.median(times), "min_s": min(times),
               "max_s": max(times), "repeats": len(times), "peak_rss_bytes": peak, **extra}
        results.append(row)
        if args.json:
            print(json.dumps(row, sort_keys=True), flush=True)
        else:
            print(f"  {name}: median {row['median_s']:.3f} s", file=sys.stderr, flush=True)
        return row

    def measure(name, once, cn1=None, **extra):
        if not args.json:
            print(f"measuring {name} ({args.warmup} warm-up + {args.repeats} timed)…", file=sys.stderr, flush=True)
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            once()
        sync()
        times = []
        out = None
        for _ in range(args.repeats):
            started = time.perf_counter()
            out = once()
            sync()
            times.append(time.perf_counter() - started)
        peak = peak_rss_bytes()
        if device.type == "cuda":
            extra["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        if out is not None and not torch.isfinite(out).all():
            print(f"warning: {name}: the output is not finite (random weights)", file=sys.stderr)
        if cn1 is not None:
            extra["cn1_over_skipped"] = cn1["median_s"] / statistics.median(times)
        return report(name, times, peak, **extra)

    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="bench-diffusers-") as scratch:
        unet = UNet2DConditionModel.from_config(cfg["unet"]).eval().to(device, dtype)
        if "load" in figures:
            folder = Path(scratch) / "unet"
            unet.save_pretrained(folder, safe_serialization=True)
            del unet
            gc.collect()
            loaded = []

            def load_once():
                loaded.clear()
                gc.collect()
                loaded.append(UNet2DConditionModel.from_pretrained(folder).eval().to(device, dtype))

            measure("load", load_once)
            unet = loaded.pop()
            gc.collect()

        sample = torch.randn(1, cfg["unet"].get("in_channels", 4), h, w).to(device, dtype)
        model_input = torch.cat([sample, sample])
        context = torch.randn(2, TEXT_TOKENS, cfg["unet"]["cross_attention_dim"]).to(device, dtype)
        timestep = torch.tensor(TIMESTEP).to(device)
        # The pipeline repeats the control image for the two CFG halves.
        hint = torch.rand(1, 3, height, width).repeat(2, 1, 1, 1).to(device, dtype)

        def unet_forward(down=None, mid=None, added=None):
            return unet(model_input, timestep, encoder_hidden_states=context,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        added_cond_kwargs=added, return_dict=False)[0]

        if "unet_step" in figures:
            measure("unet_step", unet_forward)

        if "unet_step_ip" in figures:
            unet._load_ip_adapter_weights([ip_adapter_state_dict(unet, cfg["image_embedding_width"], torch)])
            unet.to(device, dtype)
            image_embeds = torch.randn(1, 1, cfg["image_embedding_width"]).to(device, dtype)
            # diffusers' negative for a plain adapter: a zero embedding, first in the batch.
            embeds = [torch.cat([torch.zeros_like(image_embeds), image_embeds])]
            measure("unet_step_ip", lambda: unet_forward(added={"image_embeds": embeds}))
            # As the pipelines' unload_ip_adapter: back to the plain processors.
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = None
            unet.set_attn_processor(AttnProcessor2_0())

        cn_figures = {"unet_step_cn1", "cn_skipped", "unet_step_cn2"}
        if cn_figures & set(figures):
            controlnets = [ControlNetModel.from_config(cfg["controlnet"]).eval().to(device, dtype)]

            def controlled_step(scales):
                down, mid = None, None
                for controlnet, scale in zip(controlnets, scales):
                    d, m = controlnet(model_input, timestep, encoder_hidden_states=context, controlnet_cond=hint,
                                      conditioning_scale=scale, guess_mode=False, return_dict=False)
                    # MultiControlNetModel's sum.
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                return unet_forward(down, mid)

            cn1 = None
            if "unet_step_cn1" in figures:
                cn1 = measure("unet_step_cn1", lambda: controlled_step([1.0]))
            if "cn_skipped" in figures:
                def skipped():
                    return controlled_step([0.0])

                row_extra = {"note": "diffusers runs a ControlNet outside its window with conditioning_scale 0"}
                if not args.json:
                    print("measuring cn_skipped as diffusers' pipeline runs it: ControlNet at scale 0 + UNet",
                          file=sys.stderr)
                measure("cn_skipped", skipped, cn1=cn1, **row_extra)
            if "unet_step_cn2" in figures:
                controlnets.append(ControlNetModel.from_config(cfg["controlnet"]).eval().to(device, dtype))
                measure("unet_step_cn2", lambda: controlled_step([1.0, 1.0]))
            del controlnets
            gc.collect()

        if "run_20" in figures:
            vae = AutoencoderKL.from_config(cfg["vae"]).eval().to(device, dtype)
            scheduler = DDIMScheduler.from_config(cfg["scheduler"])
            init = torch.randn(1, cfg["unet"].get("in_channels", 4), h, w).to(device, dtype)

            def whole_run():
                scheduler.set_timesteps(args.steps)
                latents = init * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                    noise = unet(model_in, t, encoder_hidden_states=context, return_dict=False)[0]
                    uncond, cond = noise.chunk(2)
                    noise = uncond + GUIDANCE_SCALE * (cond - uncond)
                    latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
                return (image / 2 + 0.5).clamp(0, 1)

            measure(f"run_{args.steps}", whole_run, steps=args.steps)

    if not args.json:
        print(f"\n{'figure':<15} {'median s':>10} {'min s':>10} {'max s':>10} {'repeats':>8} {'peak RSS':>12}")
        for r in results:
            peak = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if r["peak_rss_bytes"] else "n/a"
            print(f"{r['name']:<15} {r['median_s']:>10.3f} {r['min_s']:>10.3f} {r['max_s']:>10.3f} "
                  f"{r['repeats']:>8} {peak:>12}")


def ip_adapter_state_dict(unet, image_embedding_width, torch):
    """An ip-adapter_sd15-shaped state dict with random weights: `ImageProjModel` (embedding ->
    4 tokens, layer norm) and to_k_ip / to_v_ip for every cross-attention layer, keyed 1, 3, 5, …
    as diffusers' loader expects (the same tensors `ipcompose bench` writes)."""
    width = unet.config.cross_attention_dim
    channels = unet.config.block_out_channels

    def rand(rows, cols):
        return torch.randn(rows, cols) * (2.0 / cols) ** 0.5

    image_proj = {
        "proj.weight": rand(IP_TOKENS * width, image_embedding_width),
        "proj.bias": torch.zeros(IP_TOKENS * width),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    layers = {}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        layers[f"{key}.to_k_ip.weight"] = rand(hidden, width)
        layers[f"{key}.to_v_ip.weight"] = rand(hidden, width)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


if __name__ == "__main__":
    main()
