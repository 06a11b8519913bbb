//! A generate node's image feeding other nodes: a canny hint for a second pass and an
//! IP-Adapter reference, planned in dependency order; cycles are refused.

mod common;

use std::path::Path;

use common::{fx, scratch};
use ipcompose::pipeline::run::batch::Batch;

fn header() -> String {
    format!(
        "version: 1\nmodels:\n  base: {{kind: sd15, source: {}}}\n  canny: {{kind: controlnet, source: {}}}\n  ipa: {{kind: ip-adapter, source: {}, image_encoder: {}}}\n",
        fx("tiny-sd15"),
        fx("controlnet/tiny-canny"),
        fx("ip-adapter/ip-adapter_tiny.safetensors"),
        fx("ip-adapter/image_encoder"),
    )
}

const FIRST: &str =
    "    generate: {base: base, prompt: a house, size: [64, 64], steps: 2, seed: 3}\n";
const SECOND: &str = "    generate:\n      base: base\n      prompt: a house at night\n      size: [64, 64]\n      steps: 2\n      seed: 4\n      controls: [{model: canny, image: edges, scale: 0.8}]\n      ip_adapters: [{model: ipa, image: REFERENCE, scale: 0.5}]\n";

fn run(dir: &Path, text: &str) -> Vec<std::path::PathBuf> {
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let batch = Batch::plan(text, &path, &[]).unwrap_or_else(|e| panic!("{e}"));
    let options = common::run_options();
    batch
        .run(&options, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn second_pass_reads_the_first_pass_image() {
    let dir = scratch("chain-second-pass");
    std::env::set_var("IPCOMPOSE_CACHE_DIR", dir.join("cache"));
    // Chained: `draft` feeds `edges` (canny) and the IP-Adapter of `final`. Nodes are listed
    // out of order on purpose: planning orders them by what they read.
    let chained = format!(
        "{}nodes:\n  final:\n{}  edges: {{canny: {{image: draft, low: 50, high: 100, detect_resolution: 0}}}}\n  draft:\n{FIRST}outputs:\n  - {{image: final, path: final.png}}\n",
        header(),
        SECOND.replace("REFERENCE", "draft"),
    );
    let written = run(&dir, &chained);
    assert_eq!(written, [dir.join("final.png")]);

    // By hand: the first pass written as a file, then the second pass reading that file.
    let first = format!(
        "{}nodes:\n  draft:\n{FIRST}outputs:\n  - {{image: draft, path: draft.png}}\n",
        header()
    );
    run(&dir, &first);
    let second = format!(
        "{}images:\n  drawn: draft.png\nnodes:\n  final:\n{}  edges: {{canny: {{image: drawn, low: 50, high: 100, detect_resolution: 0}}}}\noutputs:\n  - {{image: final, path: by-hand.png}}\n",
        header(),
        SECOND.replace("REFERENCE", "drawn"),
    );
    run(&dir, &second);
    let a = image::open(dir.join("final.png")).unwrap().to_rgb8();
    let b = image::open(dir.join("by-hand.png")).unwrap().to_rgb8();
    assert_eq!(
        a.as_raw(),
        b.as_raw(),
        "chained run equals the two runs by hand"
    );
}

#[test]
fn cycles_through_generate_nodes_are_refused() {
    let dir = scratch("chain-cycle");
    let text = format!(
        "{}nodes:\n  final:\n{}  edges: {{canny: {{image: final}}}}\noutputs:\n  - {{image: final, path: final.png}}\n",
        header(),
        SECOND.replace("REFERENCE", "final"),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, &text).unwrap();
    let err = match Batch::plan(&text, &path, &[]) {
        Ok(_) => panic!("a cycle was planned"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nodes form a cycle"), "{err}");
    assert!(
        err.contains("edges → final") || err.contains("final → edges"),
        "{err}"
    );
    assert!(!dir.join("final.png").exists());
}
