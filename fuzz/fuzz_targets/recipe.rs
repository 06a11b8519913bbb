//! Recipe parsing, `--set` overrides, sweep expansion and planning must return an error for
//! any input, never panic. The recipe is planned as if it sat in tests/fixtures/recipes, so
//! inputs derived from the seed corpus reach the tiny models and images and plan deeply.
#![no_main]

use std::path::PathBuf;

use ipcompose_pipeline::run::batch::Batch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Lines starting with `#set ` become `--set` overrides, so the fuzzer explores them too.
    let sets: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#set "))
        .map(str::to_string)
        .collect();
    let origin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/recipes/fuzz.yaml");
    let _ = Batch::plan(text, &origin, &sets);
});
