//! Preprocessor nodes in recipes: a canny node feeding a ControlNet on the tiny models, its
//! cache, chained preprocessors, outputs of preprocessor nodes, and the plan-time errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{fixtures, fx, max_abs_diff, scratch};
use ipcompose::pipeline::plan::preprocess::cache_dir;
use ipcompose::pipeline::plan::Plan;
use ipcompose::pipeline::{run_plan, Recipe};
use ipcompose::preprocess::{load_image, Operation, Settings};

const PHOTO: &str = "preprocess/inputs/chelsea.png";

/// A recipe in `dir`: the tiny SD1.5 base and ControlNet, the photo as `cat`, the given
/// nodes (besides `gen`, which uses `control_image` as its hint) and outputs.
fn recipe_text(nodes: &str, control_image: &str, outputs: &str) -> String {
    format!(
        r#"version: 1
models:
  base: {{kind: sd15, source: {base}}}
  canny: {{kind: controlnet, source: {canny}}}
images:
  cat: {photo}
nodes:
{nodes}
  gen:
    generate:
      base: base
      prompt: "a cat"
      size: [128, 128]
      steps: 2
      seed: 3
      controls:
        - {{model: canny, image: {control_image}, scale: 0.8}}
outputs:
{outputs}
"#,
        base = fx("tiny-sd15"),
        canny = fx("controlnet/tiny-canny"),
        photo = fx(PHOTO),
    )
}

fn plan_recipe(dir: &Path, text: &str) -> ipcompose::pipeline::Result<Plan> {
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let recipe = Recipe::parse(text, &path)?;
    Plan::build(&recipe, text, &path, dir)
}

fn run(plan: &Plan) -> Vec<PathBuf> {
    let options = common::run_options();
    run_plan(plan, &options, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"))
}

fn latents(path: &Path) -> candle_core::Tensor {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()["latents"].clone()
}

const CANNY_NODE: &str =
    "  edges: {canny: {image: cat, low: 100, high: 200, detect_resolution: 128}}";

#[test]
fn canny_node_feeds_a_controlnet_and_is_cached() {
    let dir = scratch("preprocess-recipe");
    let outputs =
        "  - {latents: gen, path: out/gen.safetensors}\n  - {image: edges, path: out/edges.png}";
    let text = recipe_text(CANNY_NODE, "edges", outputs);
    let plan = plan_recipe(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.preprocessors.len(), 1);
    let cache = plan.preprocessors[0].cache_path.clone();
    assert!(cache.starts_with(cache_dir(&dir)), "{cache:?}");
    assert_eq!(plan.generations[0].controls[0].image, cache);

    let written = run(&plan);
    assert_eq!(written.len(), 2);
    // The cached map is exactly the annotator's output for these settings.
    let expected = Settings {
        operation: Operation::Canny {
            low: 100.0,
            high: 200.0,
        },
        detect_resolution: Some(128),
        output_size: None,
    }
    .apply(&load_image(&fixtures().join(PHOTO)).unwrap())
    .unwrap();
    assert_eq!(load_image(&cache).unwrap(), expected);
    assert_eq!(load_image(&dir.join("out/edges.png")).unwrap(), expected);

    // The same recipe with the cached file as a plain image gives the same latents.
    let direct_dir = scratch("preprocess-recipe-direct");
    let direct_text = recipe_text("", "edges", "  - {latents: gen, path: out/gen.safetensors}")
        .replace(
            "images:\n",
            &format!("images:\n  edges: {}\n", cache.display()),
        )
        .replace("nodes:\n\n", "nodes:\n");
    let direct = plan_recipe(&direct_dir, &direct_text).unwrap_or_else(|e| panic!("{e}"));
    run(&direct);
    let diff = max_abs_diff(
        &latents(&dir.join("out/gen.safetensors")),
        &latents(&direct_dir.join("out/gen.safetensors")),
    );
    assert_eq!(diff, 0.0);

    // Second run: the cached file is used as it is, not recomputed. Replace it with a
    // different image to see which one the run reads.
    let marker =
        image::RgbImage::from_pixel(expected.width(), expected.height(), image::Rgb([9, 8, 7]));
    marker.save(&cache).unwrap();
    let again = plan_recipe(&dir, &text).unwrap();
    assert_eq!(again.preprocessors[0].cache_path, cache);
    run(&again);
    assert_eq!(load_image(&dir.join("out/edges.png")).unwrap(), marker);

    // Other settings are another cache entry.
    let other = plan_recipe(&dir, &text.replace("low: 100", "low: 50")).unwrap();
    assert_ne!(other.preprocessors[0].cache_path, cache);
}

#[test]
fn chained_preprocessors_run_in_order() {
    let dir = scratch("preprocess-chain");
    // Declared in reverse alphabetical dependency order on purpose: `a_inverted` reads
    // `b_edges`.
    let nodes = "  a_inverted: {invert: {image: b_edges}}\n  b_edges: {canny: {image: cat, detect_resolution: 0}}\n  unused: {blur: {image: cat}}";
    let outputs = "  - {image: a_inverted, path: inverted.png}";
    let plan = plan_recipe(&dir, &recipe_text(nodes, "a_inverted", outputs))
        .unwrap_or_else(|e| panic!("{e}"));
    let order: Vec<&str> = plan.preprocessors.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(order, ["b_edges", "a_inverted", "unused"]);
    run(&plan);
    let photo = load_image(&fixtures().join(PHOTO)).unwrap();
    let edges = ipcompose::preprocess::canny::canny(&photo, 100.0, 200.0);
    let inverted = load_image(&dir.join("inverted.png")).unwrap();
    assert_eq!(inverted, ipcompose::preprocess::simple::invert(&edges));
    // Only what the outputs need ran: not `unused`, and not `gen` (no output reads it).
    let cached = std::fs::read_dir(cache_dir(&dir)).unwrap().count();
    assert_eq!(cached, 2);
}

fn plan_error(name: &str, text: &str) -> String {
    let dir = scratch(name);
    match plan_recipe(&dir, text) {
        Ok(_) => panic!("{name}: planned without error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_image_names_are_refused_with_suggestions() {
    let outputs = "  - {latents: gen, path: out.safetensors}";
    // A control naming a misspelt preprocessor node.
    let err = plan_error(
        "preprocess-unknown-control",
        &recipe_text(CANNY_NODE, "edgse", outputs),
    );
    assert!(err.contains("unknown image `edgse`"), "{err}");
    assert!(err.contains("did you mean `edges`"), "{err}");
    // A preprocessor reading a misspelt image.
    let err = plan_error(
        "preprocess-unknown-input",
        &recipe_text("  edges: {canny: {image: cta}}", "edges", outputs),
    );
    assert!(err.contains("unknown image `cta`"), "{err}");
    assert!(err.contains("did you mean `cat`"), "{err}");
    assert!(err.contains("nodes.edges.canny.image"), "{err}");
}

#[test]
fn cycles_and_misused_nodes_are_refused() {
    let outputs = "  - {latents: gen, path: out.safetensors}";
    let err = plan_error(
        "preprocess-cycle",
        &recipe_text(
            "  x: {invert: {image: y}}\n  y: {blur: {image: x}}",
            "x",
            outputs,
        ),
    );
    assert!(err.contains("cycle: x → y → x"), "{err}");

    // A preprocessor may read a generated image, but not the one its own hint feeds.
    let err = plan_error(
        "preprocess-reads-generate",
        &recipe_text("  edges: {canny: {image: gen}}", "edges", outputs),
    );
    assert!(err.contains("nodes form a cycle"), "{err}");
    assert!(err.contains("edges → gen → edges"), "{err}");

    let err = plan_error(
        "preprocess-latents",
        &recipe_text(
            CANNY_NODE,
            "edges",
            "  - {latents: edges, path: e.safetensors}",
        ),
    );
    assert!(err.contains("no latents"), "{err}");

    let err = plan_error(
        "preprocess-two-operations",
        &recipe_text(
            "  edges: {canny: {image: cat}, invert: {image: cat}}",
            "edges",
            outputs,
        ),
    );
    assert!(err.contains("exactly one operation key"), "{err}");

    let err = plan_error(
        "preprocess-bad-factor",
        &recipe_text("  tile: {blur: {image: cat, factor: 0.5}}", "tile", outputs),
    );
    assert!(err.contains("blur factor"), "{err}");

    // An input that is not an image fails at plan time, naming it.
    let dir = scratch("preprocess-unreadable");
    let bogus = dir.join("bogus.png");
    std::fs::write(&bogus, b"not a png").unwrap();
    let text =
        recipe_text(CANNY_NODE, "edges", outputs).replace(&fx(PHOTO), &bogus.display().to_string());
    let err = plan_recipe(&dir, &text)
        .expect_err("unreadable image refused")
        .to_string();
    assert!(err.contains("cannot read image"), "{err}");
    assert!(!cache_dir(&dir).exists());
}
