//! `ipcompose bench` on the tiny models: every figure runs and reports the documented fields.
//! No timing is asserted: CI machines are shared and any threshold would be flaky.

use std::collections::BTreeSet;
use std::process::Command;

fn bench(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .arg("bench")
        .args([
            "--tiny",
            "--threads",
            "1",
            "--repeats",
            "2",
            "--warmup",
            "0",
        ])
        .args(args)
        .output()
        .expect("run ipcompose bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bench failed: {stderr}");
    (stdout, stderr)
}

#[test]
fn json_lines_carry_every_figure_and_field() {
    let (stdout, _) = bench(&[
        "--json",
        "--steps",
        "2",
        "--figures",
        "run_20,load,unet_step,unet_step_ip,unet_step_cn1,unet_step_cn2,cn_skipped",
    ]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    // Measured in a fixed order whatever the order asked for; `run_N` is named by its steps.
    assert_eq!(
        names,
        [
            "load",
            "unet_step",
            "unet_step_ip",
            "unet_step_cn1",
            "cn_skipped",
            "unet_step_cn2",
            "run_2"
        ]
    );
    for line in &lines {
        for field in ["median_s", "min_s", "max_s"] {
            let value = line[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} in {line}"));
            assert!(value >= 0.0, "{line}");
        }
        assert!(
            line["min_s"].as_f64() <= line["median_s"].as_f64(),
            "{line}"
        );
        assert!(
            line["median_s"].as_f64() <= line["max_s"].as_f64(),
            "{line}"
        );
        assert_eq!(line["repeats"], 2, "{line}");
        assert!(
            line["peak_rss_bytes"].is_u64() || line["peak_rss_bytes"].is_null(),
            "{line}"
        );
        assert_eq!(line["threads"], 1, "{line}");
        assert_eq!(
            (line["width"].as_u64(), line["height"].as_u64()),
            (Some(128), Some(128))
        );
    }
    let skipped = &lines[4];
    assert!(skipped["cn1_over_skipped"].as_f64().is_some(), "{skipped}");
}

#[test]
fn table_and_figure_selection() {
    let (stdout, _) = bench(&["--figures", "unet_step", "--width", "64", "--height", "96"]);
    assert!(stdout.contains("64x96 (latents 8x12)"), "{stdout}");
    let rows: BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("unet_") || *w == "load")
        .collect();
    assert_eq!(rows, BTreeSet::from(["unet_step"]), "{stdout}");

    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(["bench", "--tiny", "--figures", "unet_step,warp_speed"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("warp_speed"),
        "{stderr}"
    );
}
